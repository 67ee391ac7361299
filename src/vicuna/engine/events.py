"""The typed events a generation yields; the chat, the server, the web UI and the benchmarks read them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled (or scored prompt) token's log-probability and the most likely alternatives. `token` is the
    token's own text (a byte of a character split across tokens written as `\\xe4`), `raw` its bytes.
    `logprob` is None for a prompt's first token, which nothing before it predicts."""

    token_id: int
    token: str
    logprob: float | None
    top: tuple[tuple[int, str, float, bytes], ...] = ()  # (token id, text, logprob, bytes), best first
    raw: bytes = b""


@dataclass(frozen=True)
class TextChunk:
    """New text for the reply. `text` never ends inside a multi-byte character and never contains any
    part of a stop string; it may be empty while text is held back. `token_ids` are the tokens sampled
    since the last chunk."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class Finished:
    """The last event of every generation."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float  # request start to first sampled token
    decode_tokens_per_s: float  # tokens after the first, per second after the first
    total_s: float
    stop_text: str | None = None  # the stop string or stop token text that ended the reply
    # The logprob of the stop token that ended the reply, where logprobs were asked: sampled like any
    # token, though its text is never shown (a completion's logprobs list it, as OpenAI's and vLLM's do)
    stop_logprobs: tuple[TokenLogprob, ...] = ()


Event = TextChunk | Finished


def decode_rate(tokens: int, first_at: float, end: float) -> float:
    """`Finished.decode_tokens_per_s`, the same for every runner and benchmark; 0 without a second token."""
    return (tokens - 1) / (end - first_at) if tokens > 1 and end > first_at else 0.0
