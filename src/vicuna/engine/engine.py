"""Generation as a stream of typed events: prefill, then one token at a time, each step a small function.

`Engine.generate` yields `TextChunk`s as text becomes safe to show (whole characters, no part of a
stop string) and ends with one `Finished` that carries the counts and the speed the user felt.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch

from vicuna.config import SamplingParams
from vicuna.conversation import Message, Template, render
from vicuna.engine.detok import IncrementalDecoder, StopMatcher, TokenBytes
from vicuna.engine.events import Event, Finished, TextChunk, TokenLogprob, decode_rate
from vicuna.engine.memory import release_memory_after
from vicuna.engine.runner import (
    PREFILL_PIECE,
    HFRunner,
    LlamaRunner,
    LlamaWeights,
    Runner,
    llama_fast_path_ok,
    shared_prefix,
)
from vicuna.engine.sampling import Sampler
from vicuna.engine.typed import mask, retokenize, special_texts
from vicuna.errors import ContextTooLongError, VicunaError

SCORE_PIECE = 256  # prompt positions whose logits `Engine.score` turns into float32 logprobs at a time


def context_length(config: Any) -> int | None:
    """The positions the model was made for, as its config names them; None where it names none. MPT's
    is `max_seq_len`, the length of its ALiBi table: read as no length at all, a window of 2048 was taken,
    so mpt-30b-chat's conversations lost exchanges at a quarter of its 8192, and a model of less failed
    with a RuntimeError from transformers on its first longer prompt."""
    text = config.get_text_config()
    for name in ("max_position_embeddings", "max_seq_len"):
        if value := getattr(text, name, None):
            return scaled_positions(text, int(value))
    return None


def scaled_positions(text_config: Any, positions: int) -> int:
    """The positions a model with linear or YaRN RoPE scaling was made for: its original window (the config's
    `max_position_embeddings` where the scaling names none) times the factor. Vicuna v1.5-16k's config says
    4096 positions, the window of Llama 2 it was tuned from, and `"rope_scaling": {"type": "linear",
    "factor": 4.0}` for its 16,384 (as FastChat and vLLM read it): read as 4,096, its long prompts were
    refused, chats lost exchanges at a quarter of its window and `vicuna train` refused --max-length 16384.
    Not dynamic NTK scaling, which transformers computes anew past the window, where our fast path's rotary
    table would no longer be the model's; llama3's and longrope's configs give the scaled count."""
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None)
    if not isinstance(rope, dict) or (rope.get("rope_type") or rope.get("type")) not in ("linear", "yarn"):
        return positions
    original = rope.get("original_max_position_embeddings") or positions
    return max(positions, int(original * float(rope.get("factor") or 1.0)))


def context_window(config: Any) -> int:
    return context_length(config) or 2048


def end_token_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """Token ids that end a reply: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return tuple(sorted(i for i in ids if i is not None))


def prompt_tokens(prompt_ids: Sequence[int]) -> list[int]:
    """`prompt_ids` as a list of ints (a tuple, a 1-D tensor or array too), or an error a Python caller can
    act on where the runner's own was obscure: text for ids ("'str' object cannot be interpreted as an
    integer"), a tuple (an IndexError), no ids at all (`encode("")` where the tokenizer adds no BOS:
    "prefill: cannot start at 0 of 0 tokens")."""
    if isinstance(prompt_ids, str):
        raise TypeError("the prompt must be token ids, not text: engine.encode(text) gives them")
    try:
        ids = [int(i) for i in prompt_ids]
    except (TypeError, ValueError, RuntimeError):  # a [1, n] tensor's row: "only one element tensors ..."
        raise TypeError(
            "the prompt must be one sequence of token ids (engine.encode(text) gives one)"
        ) from None
    if not ids:
        raise VicunaError("the prompt is empty: at least one token is needed")
    return ids


def check_params(params: Any) -> None:
    """Refuse settings that are not a `SamplingParams`, said where the caller can act on it: OpenAI-style
    keyword arguments as a dict ended in "'dict' object has no attribute 'stop'" from deep in the engine."""
    if not isinstance(params, SamplingParams):
        raise TypeError(
            "params must be a vicuna.config.SamplingParams, e.g. SamplingParams(temperature=0, "
            f"max_new_tokens=64) (a dict d: SamplingParams(**d)), not {type(params).__name__}"
        )


def check_cancel(cancel: Any) -> None:
    """Refuse a `cancel` that is not an event: True, or the class `threading.Event` itself, failed only at
    the reply's first step ("'bool' object has no attribute 'is_set'"), in a batcher on its own thread."""
    if cancel is not None and not isinstance(cancel, threading.Event):
        raise TypeError(f"cancel must be a threading.Event() (set it to stop the reply), not {cancel!r}")


class Engine:
    """One model, its tokenizer and its template; generates one reply at a time (the server batches)."""

    def __init__(
        self, *, model: Any, tokenizer: Any, template: Template, model_name: str, fast_path: bool = True
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.model_name = model_name
        self.context_window = context_window(model.config)
        self.end_ids = end_token_ids(model, tokenizer)
        self.token_bytes = TokenBytes(tokenizer)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.template_stop_ids, self.template_stop_strings = self._split_stops(template.stop)
        self.special_texts = special_texts(tokenizer)
        # the fused LLaMA weights of the fast decode path (the batcher shares them), or None
        self.llama_weights = LlamaWeights(model) if fast_path and llama_fast_path_ok(model) else None
        self._spare: tuple[LlamaRunner, list[int]] | None = None  # the last generation's runner, its tokens
        self._lock = threading.Lock()
        self._teams: dict[int, Any] = {}  # per thread that decodes: its kernel.Team
        self._appends_eos: bool | None = None  # whether the tokenizer ends what it encodes with EOS

    def _split_stops(self, stops: Sequence[str]) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Stop strings that are single special tokens become stop ids (their text is never decoded)."""
        ids, strings = [], []
        special = set(self.tokenizer.all_special_tokens) | set(
            getattr(self.tokenizer, "added_tokens_encoder", {})
        )
        for stop in stops:
            if stop in special:
                ids.append(self.tokenizer.convert_tokens_to_ids(stop))
            else:
                strings.append(stop)
        return tuple(ids), tuple(strings)

    # --- prompts ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for a prompt; BOS is added as the tokenizer does, unless the text already has it
        (or `add_special_tokens` is False: a chat template's text, which holds what it wants)."""
        adds = add_special_tokens and self._adds_bos(text)
        ids = list(self.tokenizer(text, add_special_tokens=adds)["input_ids"])
        return ids[: len(ids) - self._appended_eos(ids, adds)]

    def text_starts(self, text: str) -> list[int] | None:
        """Where each of `encode(text)`'s tokens begins in `text` (the tokenizer's own character offsets; a
        BOS it added at 0), or None where the tokenizer cannot say (a slow one)."""
        if not getattr(self.tokenizer, "is_fast", False):
            return None
        adds = self._adds_bos(text)
        enc = self.tokenizer(text, add_special_tokens=adds, return_offsets_mapping=True)
        cut = len(enc["input_ids"]) - self._appended_eos(enc["input_ids"], adds)
        return [start for start, _ in enc["offset_mapping"][:cut]]

    def _appended_eos(self, ids: Sequence[int], added: bool) -> int:
        """1 where the tokenizer ended `ids` with an EOS of its own (one saved with `add_eos_token=True`):
        a reply must not begin after an end of text, and training (`train.data`) never puts one there."""
        if self._appends_eos is None:
            eos = self.tokenizer.eos_token_id
            self._appends_eos = eos is not None and self.tokenizer("x")["input_ids"][-1:] == [eos]
        return int(added and self._appends_eos and ids[-1:] == [self.tokenizer.eos_token_id])

    def _adds_bos(self, text: str) -> bool:
        """Whether the tokenizer is to add its BOS (and other special tokens): not when `text` has it."""
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def render_chat(self, messages: Sequence[Message]) -> str:
        return render(self.template, messages)

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """Token ids for a chat prompt, where the text of a message is only ever text (`vicuna.engine.typed`):
        without special-token text in the messages, exactly the tokenizer's ids for the rendered prompt."""
        if isinstance(messages, Message):  # one message: "'Message' object is not iterable" said nothing more
            raise TypeError(
                "messages must be a list of Message: engine.chat([Message(role, content)], params)"
            )
        if not all(isinstance(m, Message) for m in messages):  # said here, not as an AttributeError deep in
            raise TypeError(  # the template ("'dict' object has no attribute 'content'")
                "messages must be vicuna.conversation.Message(role, content); OpenAI-style dicts become "
                "them with vicuna.conversation.parse_messages"
            )
        masked = mask(messages, self.special_texts)
        if masked is None:
            return self.encode(self.render_chat(messages), self.template.add_special_tokens)
        if not getattr(self.tokenizer, "is_fast", True):  # no character offsets to place the typed text by
            typed = ", ".join(repr(t) for t in masked.marks.values())
            raise VicunaError(
                f"a message holds {typed}, a special token's text, which this model's tokenizer (a slow one) "
                "cannot keep as text: leave it out"
            )
        marked = self.render_chat(masked.messages)  # a typed "<s>" at its start is no BOS
        adds = self.template.add_special_tokens and self._adds_bos(marked)
        enc = self.tokenizer(masked.unmask(marked), add_special_tokens=adds, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        cut = len(ids) - self._appended_eos(ids, adds)
        return retokenize(self.tokenizer, ids[:cut], offsets[:cut], masked.typed_at)[0]

    def stop_params(self, params: SamplingParams) -> SamplingParams:
        """The request's settings with its stop strings that are special tokens ("<|im_end|>" where it is
        no end token) also stop token ids: a reply's text never holds a special token's text, so as a
        string alone such a stop never matched and the reply ran on past it to its token limit."""
        check_params(params)
        ids = self._split_stops(params.stop)[0]
        return replace(params, stop_token_ids=tuple(dict.fromkeys((*params.stop_token_ids, *ids))))

    def chat_params(self, params: SamplingParams) -> SamplingParams:
        """The request's settings (`stop_params`) plus the template's end-of-turn markers (but not EOS with
        `ignore_eos`, where the template's marker is the EOS token, as it often is)."""
        params = self.stop_params(params)
        template_ids = [i for i in self.template_stop_ids if not (params.ignore_eos and i in self.end_ids)]
        return replace(
            params,
            stop=tuple(dict.fromkeys((*params.stop, *self.template_stop_strings))),
            stop_token_ids=tuple(dict.fromkeys((*params.stop_token_ids, *template_ids))),
        )

    def chat(
        self, messages: Sequence[Message], params: SamplingParams, *, cancel: threading.Event | None = None
    ) -> Iterator[Event]:
        """Stream the assistant's reply to `messages` in the model's template (`generate`'s events); the
        template's end-of-turn markers stop it. Raises ContextTooLongError and MessagesError at once."""
        return self.generate(self.encode_chat(messages), self.chat_params(params), cancel=cancel)

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len + max_new_tokens > self.context_window:
            raise ContextTooLongError(prompt_len, max_new_tokens, self.context_window)

    # --- generation ---------------------------------------------------------------------------

    def new_runner(self, prompt_ids: Sequence[int] = ()) -> tuple[Runner, int]:
        """A runner for `prompt_ids`, and how many of the prompt's first tokens it already holds: the last
        finished generation's runner and KV cache are taken over, so the next turn of a chat (whose
        prompt begins with the last prompt and reply) computes only the new tokens."""
        if self.llama_weights is None:
            return HFRunner(self.model, self.device), 0
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is None:
            return LlamaRunner(self.llama_weights, None), 0
        runner, tokens = spare
        return runner, shared_prefix(tokens, prompt_ids, min(len(tokens), len(prompt_ids) - 1))

    def team(self) -> Any:
        """The calling thread's `kernel.Team` (it sizes the kernel's threads from the steps' times), where
        the kernel decodes on the CPU; else None."""
        if self.device.type != "cpu" or self.llama_weights is None:
            return None
        from vicuna.engine import kernel

        library = kernel.load(progress=False)
        if library is None:
            return None
        with self._lock:
            return self._teams.setdefault(threading.get_ident(), kernel.Team(library))

    def forget(self) -> None:
        """Drop the last generation's cache: the next prompt is computed from its first token (benchmarks
        of prompt processing call this)."""
        with self._lock:
            self._spare = None

    def _release(self, runner: Runner, history: list[int]) -> None:
        if isinstance(runner, LlamaRunner) and runner.rows == 1:
            with self._lock:
                self._spare = (runner, history[: runner.lengths[0]])

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, *, cancel: threading.Event | None = None
    ) -> Iterator[Event]:
        """Stream a reply to `prompt_ids`. Raises ContextTooLongError before the first event."""
        check_params(params)
        check_cancel(cancel)
        prompt_ids = prompt_tokens(prompt_ids)
        self.check_fits(len(prompt_ids), params.max_new_tokens)
        return self._generate(prompt_ids, params, cancel)

    def _generate(
        self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None
    ) -> Iterator[Event]:
        team = self.team()
        events = self._reply(prompt_ids, params, cancel, team)
        try:
            while True:  # the team's threads for the reply's work, the caller's for its own between events
                with team.threads() if team is not None else contextlib.nullcontext():
                    event = next(events, None)
                if event is None:
                    return
                yield event
        except RuntimeError as error:  # out of memory (CUDA's error, or mps's RuntimeError): the caller
            release_memory_after(error)  # says so, and the GPU gets back what the reply held
            raise

    def _reply(
        self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None, team: Any
    ) -> Iterator[Event]:
        start = time.perf_counter()
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.end_ids))
        sampler = Sampler(params, prompt_len=len(prompt_ids), end_ids=sorted(stop_ids), device=self.device)
        decoder, stops = IncrementalDecoder(self.tokenizer, prompt_ids), StopMatcher(params.stop)
        history = list(prompt_ids)
        runner, cached = self.new_runner(prompt_ids)
        first_token_at = None
        reason, stop_text, stop_logprobs = "length", None, ()
        if isinstance(runner, LlamaRunner):  # in the server's pieces, so that a reply is the same there
            logits, done = runner.prefill_more(prompt_ids, cached, PREFILL_PIECE)
            while done < len(prompt_ids) and not (cancel is not None and cancel.is_set()):
                logits, done = runner.prefill_more(prompt_ids, done, PREFILL_PIECE)
        else:
            logits = runner.prefill(prompt_ids)
        for step in range(params.max_new_tokens):
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            choice = sampler(logits, history)
            history.append(choice.token_id)
            if first_token_at is None:
                first_token_at = time.perf_counter()
            logprobs = self.token_logprobs(choice) if params.logprobs is not None else None
            if choice.token_id in stop_ids:
                reason, stop_text = "stop", self.tokenizer.convert_ids_to_tokens(choice.token_id)
                stop_logprobs = logprobs or ()
                break
            text = stops.push(decoder.add(choice.token_id), quiet=step + 1 < params.min_new_tokens)
            yield TextChunk(text, (choice.token_id,), logprobs)
            if stops.matched is not None:
                reason, stop_text = "stop", stops.matched
                break
            if step + 1 < params.max_new_tokens:
                began = time.perf_counter()
                logits = runner.step(choice.token_id)
                if team is not None:
                    team.timed(time.perf_counter() - began, 1)
        self._release(runner, history)
        if stops.matched is None:
            # the text of the tokens so far: quiet if they are fewer than min_new_tokens (cancelled, or a short limit)
            quiet = len(history) - len(prompt_ids) < params.min_new_tokens
            tail = stops.push(decoder.flush(), quiet=quiet)
            tail += "" if stops.matched is not None else stops.flush()
            if stops.matched is not None:
                reason, stop_text = "stop", stops.matched
            if tail:
                yield TextChunk(tail, ())
        end = time.perf_counter()
        completion = len(history) - len(prompt_ids)
        first = first_token_at or end
        yield Finished(
            reason=reason,
            prompt_tokens=len(prompt_ids),
            completion_tokens=completion,
            ttft_s=first - start,
            decode_tokens_per_s=decode_rate(completion, first, end),
            total_s=end - start,
            stop_text=stop_text,
            stop_logprobs=stop_logprobs,
        )

    @torch.inference_mode()
    def score(self, prompt_ids: Sequence[int], top: int) -> tuple[TokenLogprob, ...]:
        """Each prompt token's logprob given the tokens before it, with the `top` most likely tokens there
        (the first token's logprob is None): what a completion with `echo` and `logprobs` returns, which
        evaluation harnesses sum over a continuation. Computed by the transformers model in one forward
        over the whole prompt, so it is the model's own log-likelihood; softmax in float32, a piece of
        positions at a time. Out of GPU memory, the memory the forward held is given back, as a reply's is."""
        vocab = self.model.config.get_text_config().vocab_size
        # refused before the forward: torch's topk said "selected index k out of range" or "must be int"
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= vocab:
            raise VicunaError(f"top must be an int from 0 to the vocabulary's {vocab} tokens, not {top!r}")
        prompt_ids = prompt_tokens(prompt_ids)
        ids = torch.tensor([prompt_ids], device=self.device)
        try:
            logits = self.model(input_ids=ids, use_cache=False).logits[0]
        except RuntimeError as error:  # out of memory: the logits of a long prompt, over the whole vocabulary
            release_memory_after(error)
            raise
        text, raw = self.token_bytes.text, self.token_bytes
        out = [TokenLogprob(prompt_ids[0], text(prompt_ids[0]), None, (), raw(prompt_ids[0]))]
        for start in range(0, len(prompt_ids) - 1, SCORE_PIECE):
            following = ids[0, start + 1 : start + 1 + SCORE_PIECE]
            logprobs = torch.log_softmax(logits[start : start + len(following)].float(), dim=-1)
            chosen = logprobs.gather(1, following[:, None])[:, 0].tolist()
            tops = torch.topk(logprobs, top) if top else None
            for j, token_id in enumerate(following.tolist()):
                alternatives = ()
                if tops is not None:
                    pairs = zip(tops.indices[j].tolist(), tops.values[j].tolist(), strict=True)
                    alternatives = tuple((i, text(i), lp, raw(i)) for i, lp in pairs)
                out.append(TokenLogprob(token_id, text(token_id), chosen[j], alternatives, raw(token_id)))
        return tuple(out)

    def token_logprobs(self, choice) -> tuple[TokenLogprob, ...]:
        """A sampled token's logprob event (one token): text and bytes of it and of its alternatives."""
        raw, text = self.token_bytes, self.token_bytes.text
        top = tuple((i, text(i), lp, raw(i)) for i, lp in choice.top)
        return (
            TokenLogprob(choice.token_id, text(choice.token_id), choice.logprob, top, raw(choice.token_id)),
        )
