"""Streaming text out of token ids: whole characters only, and never any part of a stop string."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], **kwargs) -> str: ...


class IncrementalDecoder:
    """Turns tokens into text pieces as they arrive.

    Each step decodes a short window of recent tokens and emits what the new token added; while the
    window ends in an incomplete UTF-8 sequence (byte-fallback tokens, byte-level BPE), the text is held
    back. Decoding a window rather than one token keeps SentencePiece's word-boundary spaces right.
    The pieces joined equal the decode of all the tokens, except for a last character left incomplete.
    """

    def __init__(self, tokenizer: Decoder) -> None:
        # A fast tokenizer's own `tokenizers` backend decodes the same text without transformers' per-call
        # argument handling (~15 us of Python a call, twice a token for every row of a batch).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self._decode = lambda ids: tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens whose text has been emitted

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """What is still held back, at the end of a reply. A character cut off by the reply's token
        limit (its first bytes only) is dropped rather than shown as U+FFFD."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        tail = after[len(before) :]
        return tail[:-1] if tail.endswith("\ufffd") else tail  # one U+FFFD stands for the cut bytes


class StopMatcher:
    """Holds back text that could be the start of a stop string, and cuts the text at a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """Text that is safe to show; after a match, `matched` is set and later text is dropped."""
        if self.matched is not None:
            return ""
        buf = self._held + text
        hits = [(buf.find(s), s) for s in self._stops if s in buf]
        if hits:
            at, self.matched = min(hits)
            self._held = ""
            return buf[:at]
        keep = 0
        for stop in self._stops:  # the longest end of buf that begins some stop string
            for n in range(min(len(stop) - 1, len(buf)), keep, -1):
                if stop.startswith(buf[-n:]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.matched is not None else held
