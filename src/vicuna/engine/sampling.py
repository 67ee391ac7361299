"""Choosing the next token: logits processors and a sampler built from a request's SamplingParams.

Each processor is a small function `(logits[V], history) -> logits`; `Sampler` composes the ones a
request asks for, then picks greedily (temperature 0) or samples with its own seeded generator, so
requests batched together keep their own settings and their own random streams.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vicuna.config import SamplingParams
from vicuna.engine import kernel

Processor = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]

# Below this temperature a draw is the greedy pick (as in vLLM): what a draw could give otherwise is a
# token within ~1e-4 of the top logit, and dividing by far smaller temperatures (from ~1e-37) overflows
# float32, which leaves no distribution to draw from.
MIN_TEMPERATURE = 1e-5


def repetition_penalty(penalty: float) -> Processor:
    """CTRL's penalty over prompt and reply (as transformers does): divide positive logits, multiply negative."""

    def apply(logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        if not history:
            return logits
        ids = torch.tensor(sorted(set(history)), device=logits.device)
        seen = logits[ids]
        logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
        return logits

    return apply


def presence_frequency_penalty(presence: float, frequency: float, prompt_len: int) -> Processor:
    """OpenAI's penalties, over the reply's tokens only: minus presence once, minus frequency per use."""

    def apply(logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        reply = history[prompt_len:]
        if not reply:
            return logits
        ids, counts = torch.tensor(reply, device=logits.device).unique(return_counts=True)
        logits[ids] -= presence + frequency * counts.to(logits.dtype)
        return logits

    return apply


def logit_bias(bias: Sequence[tuple[int, float]], device: torch.device) -> Processor:
    """OpenAI's logit_bias: each value added to its token's logit (-100 all but bans it, 100 all but forces it)."""
    ids = torch.tensor([i for i, _ in bias], device=device)
    values = torch.tensor([b for _, b in bias], device=device)

    def apply(logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        return logits.index_add_(0, ids, values.to(logits.dtype))

    return apply


def top_k_filter(k: int) -> Processor:
    def apply(logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        if k >= logits.shape[-1]:
            return logits
        kth = torch.topk(logits, k).values[-1]
        return logits.masked_fill(logits < kth, float("-inf"))

    return apply


def top_p_filter(p: float) -> Processor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least p.

    The set is looked for among the k most likely tokens (`torch.topk`, sorted; k = 64, 512, 4096) until
    they hold at least p of the mass, since every token outside them comes after that mass; only a flat
    distribution sorts the whole vocabulary. On a 2-core CPU a sort of 49,152 logits took ~4.6 ms, a
    decode step's third, and a model's peaked distribution ~0.1-0.5 ms this way."""

    def apply(logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        probs, n = logits.softmax(-1), logits.shape[-1]
        for k in (64, 512, 4096, n):
            top, order = torch.topk(probs, k) if k < n else torch.sort(probs, descending=True)
            cumulative = top.cumsum(-1)
            if k >= n or cumulative[-1] >= p:
                break
        keep = order[cumulative - top < p]  # the mass before these tokens is still short of p
        out = torch.full_like(logits, float("-inf"))
        out[keep] = logits[keep]
        return out

    return apply


def min_p_filter(min_p: float) -> Processor:
    """Drop the tokens less likely than `min_p` times the most likely one (vLLM's and transformers' min_p):
    a cut that follows the model's confidence, where top-p keeps a long tail of a flat distribution. In
    logits, a token's probability over the best one's is exp(its logit - the best logit), so no softmax."""
    floor = math.log(min_p)

    def apply(logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        return logits.masked_fill(logits < logits.max() + floor, float("-inf"))

    return apply


@dataclass(frozen=True)
class Choice:
    token_id: int
    logprob: float | None = None  # log-probability under the model's distribution (before filters)
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens and their log-probabilities


class Sampler:
    """Picks tokens for one request."""

    def __init__(
        self, params: SamplingParams, *, prompt_len: int, end_ids: Sequence[int], device: torch.device
    ):
        self.params, self.prompt_len = params, prompt_len
        # min_new_tokens: the end tokens are held back until the reply is that long. Not a processor: a
        # held-back token seldom wins the argmax, so the row is masked (copied) only when one does.
        self.held_back = sorted(set(end_ids)) if params.min_new_tokens else []
        self._held_back = torch.tensor(self.held_back, dtype=torch.long, device=device)
        self.processors: list[Processor] = []
        if params.logit_bias:
            self.processors.append(logit_bias(params.logit_bias, device))
        if params.repetition_penalty != 1.0:
            self.processors.append(repetition_penalty(params.repetition_penalty))
        if params.presence_penalty or params.frequency_penalty:
            self.processors.append(
                presence_frequency_penalty(params.presence_penalty, params.frequency_penalty, prompt_len)
            )
        # the temperature a draw divides by; with top-k, top-p or min-p it divides first, as transformers'
        # and vLLM's samplers do (FastChat's too): top-p's nucleus is that of the distribution sampled from
        self.temperature = params.temperature
        self.sampling = sampling = params.temperature >= MIN_TEMPERATURE
        if sampling and (params.top_k or params.top_p < 1.0 or params.min_p):
            self.processors.append(lambda logits, history: logits.div_(params.temperature))
            self.temperature = 1.0
        if sampling and params.top_k:
            self.processors.append(top_k_filter(params.top_k))
        if sampling and params.top_p < 1.0:
            self.processors.append(top_p_filter(params.top_p))
        if sampling and params.min_p:
            self.processors.append(min_p_filter(params.min_p))
        self._work: torch.Tensor | None = None
        self.generator: torch.Generator | None = None
        self.random: random.Random | None = None
        if sampling:
            # Any integer seed: its low 64 bits, for both random streams. Python's `random` seeds with the
            # integer's absolute value, so -5 and 5 drew the same tokens on the CPU (not on a GPU), and the
            # choices of a request with seed -2 and n 4 (seeds -2, -1, 0, 1) repeated one another.
            seed = None if params.seed is None else params.seed & 0xFFFF_FFFF_FFFF_FFFF
            # On the CPU our kernel draws each token (`kernel.sample`) with this request's own random
            # numbers (seeded from the OS without a seed); elsewhere PyTorch's multinomial, with its generator.
            if device.type == "cpu" and kernel.load(progress=False) is not None:
                self.random = random.Random(seed)
            self.generator = torch.Generator(device=device)
            if seed is not None:
                self.generator.manual_seed(seed if device.type != "cpu" else cpu_generator_seed(seed))
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: Sequence[int]) -> Choice:
        """`logits` is the float32 row for the next position; `history` is prompt plus reply so far."""
        raw = logits
        sample = self.sampling
        hold = bool(self.held_back) and len(history) - self.prompt_len < self.params.min_new_tokens
        if self.processors or (sample and hold):  # in place: a copy, into memory kept for the next token
            if self._work is None or self._work.shape != logits.shape or self._work.device != logits.device:
                self._work = torch.empty_like(logits)
            logits = self._work.copy_(logits)
            if sample and hold:  # before top-k and top-p, which keep only what may be picked
                logits.index_fill_(0, self._held_back, float("-inf"))
        for process in self.processors:
            logits = process(logits, history)
        if sample:
            token = (
                None if self.random is None else kernel.sample(logits, self.temperature, self.random.random())
            )
            if token is None:  # not on our kernel, or no distribution (PyTorch's multinomial says why)
                probs = torch.softmax(logits / self.temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=self.generator))
        else:
            token = _argmax(logits)
            if hold and token in self.held_back:
                token = _argmax(logits.index_fill(0, self._held_back, float("-inf")))
        if self.params.logprobs is None:
            return Choice(token)
        logprobs = torch.log_softmax(raw, dim=-1)
        top = ()
        if self.params.logprobs:
            values, ids = torch.topk(logprobs, self.params.logprobs)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        return Choice(token, float(logprobs[token]), top)


def cpu_generator_seed(seed: int) -> int:
    """`seed` (64 bits) for PyTorch's CPU generator, whose Mersenne Twister keeps only a seed's low 32 bits:
    without our kernel, seeds differing only above bit 31 (5 and 2**32 + 5) drew the same tokens on the
    CPU, not on a GPU. The high half is folded in, mixed so that 2**32 + 5 does not draw as a seed near 5;
    a seed below 2**32 is itself, and draws as before."""
    high = seed >> 32
    return (seed ^ (high * 0x9E37_79B1)) & 0xFFFF_FFFF


def _argmax(row: torch.Tensor) -> int:
    # a batch step samples every row: on the CPU our kernel's argmax where it is loaded (see
    # `kernel.argmax`), else NumPy's (~5 us with warm caches, PyTorch's ~75 us)
    if row.device.type != "cpu":
        return int(torch.argmax(row))
    best = kernel.argmax(row)
    return int(row.numpy().argmax()) if best is None else best
