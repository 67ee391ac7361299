"""Sampling settings do what they say, and each request has its own reproducible random stream."""

from __future__ import annotations

import math

import pytest
import torch

from vicuna.config import SamplingParams
from vicuna.engine.sampling import Sampler, min_p_filter, top_p_filter
from vicuna.errors import VicunaError

CPU = torch.device("cpu")
LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0])


def sampler(**kw):
    return Sampler(SamplingParams(**kw), prompt_len=2, end_ids=[4], device=CPU)


def test_greedy_and_top_k_1_pick_the_best():
    assert sampler(temperature=0)(LOGITS, [0, 0]).token_id == 1
    assert all(sampler(temperature=5.0, top_k=1, seed=s)(LOGITS, [0, 0]).token_id == 1 for s in range(10))


@pytest.mark.parametrize("temperature", [1e-6, 1e-38, 1e-40, 1e-46])
@pytest.mark.parametrize("kw", [{}, {"top_p": 0.9}, {"top_k": 3}])
def test_a_tiny_temperature_picks_the_best(temperature, kw):
    """1 / temperature overflows float32 from ~3e-39 (logits / temperature from ~1e-37): the draw has no
    distribution left, and gave any token or raised."""
    logits = LOGITS * 30  # logits of a model's size
    assert all(
        sampler(temperature=temperature, seed=s, **kw)(logits.clone(), [0, 0]).token_id == 1 for s in range(5)
    )


def test_seed_reproduces_and_differs():
    s = sampler(temperature=1.5, seed=7)
    first = [s(LOGITS, [0]).token_id for _ in range(30)]
    s = sampler(temperature=1.5, seed=7)
    assert [s(LOGITS, [0]).token_id for _ in range(30)] == first
    assert len(set(first)) > 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = top_p_filter(0.7)(probs.clone(), []).isfinite().tolist()
    assert kept == [True, True, False, False]
    kept = top_p_filter(0.5)(probs.clone(), []).isfinite().tolist()
    assert kept == [True, False, False, False]


def test_repetition_penalty_discourages_seen_tokens():
    assert sampler(temperature=0, repetition_penalty=10.0)(LOGITS, [1]).token_id == 2


def test_repetition_penalty_discourages_seen_tokens_with_negative_logits_too():
    """CTRL's penalty divides a positive logit and multiplies a negative one: dividing -1 would raise it."""
    logits = torch.tensor([-1.0, -1.5])
    assert sampler(temperature=0, repetition_penalty=2.0)(logits, [0]).token_id == 1  # -1 * 2 < -1.5


def test_frequency_penalty_counts_each_use_in_the_reply():
    logits = torch.tensor([3.0, 2.0, 0.0])
    once, twice = [0, 0, 0], [0, 0, 0, 0]  # prompt_len 2: token 0 used once, then twice in the reply
    assert sampler(temperature=0, frequency_penalty=0.6)(logits, once).token_id == 0  # 3 - 0.6 > 2
    assert sampler(temperature=0, frequency_penalty=0.6)(logits, twice).token_id == 1  # 3 - 1.2 < 2
    # presence is once, however often: 3 - 0.6 stays above 2
    assert sampler(temperature=0, presence_penalty=0.6)(logits, twice).token_id == 0


def test_logit_bias_forces_and_bans_tokens():
    assert sampler(temperature=0, logit_bias=[(3, 100.0)])(LOGITS, [0]).token_id == 3
    assert sampler(temperature=0, logit_bias=[(1, -100.0)])(LOGITS, [0]).token_id == 2


def test_presence_penalty_counts_only_the_reply():
    # token 1 in the prompt only: no penalty; in the reply: penalised below token 2
    assert sampler(temperature=0, presence_penalty=2.0)(LOGITS, [1, 1]).token_id == 1
    assert sampler(temperature=0, presence_penalty=2.0)(LOGITS, [0, 0, 1]).token_id == 2


@pytest.mark.parametrize("kw", [{"temperature": 0}, {"temperature": 1.0, "top_k": 1, "seed": 1}])
def test_min_new_tokens_holds_back_the_end_token_without_changing_the_callers_logits(kw):
    logits = torch.tensor([0.0, 1.0, 0.0, 0.0, 30.0])
    given = logits.clone()
    assert sampler(min_new_tokens=2, **kw)(logits, [0, 0, 3]).token_id == 1  # the best of the others
    assert sampler(min_new_tokens=2, **kw)(logits, [0, 0, 3, 3]).token_id == 4
    assert torch.equal(logits, given)


def test_a_draw_holds_back_the_end_token_without_changing_the_callers_logits():
    logits = torch.tensor([0.0, 0.0, 0.0, 0.0, 30.0])
    given = logits.clone()
    draw = sampler(temperature=1.0, min_new_tokens=2, seed=3)
    assert all(draw(logits, [0, 0, 3]).token_id != 4 for _ in range(20))
    assert torch.equal(logits, given)


def test_logprobs_are_from_the_model_distribution():
    choice = sampler(temperature=0, logprobs=2)(LOGITS, [0])
    expected = torch.log_softmax(LOGITS, -1)
    assert choice.logprob == pytest.approx(float(expected[1]))
    assert [i for i, _ in choice.top] == [1, 2]
    # the logprobs of the model's own distribution, not of the one a penalty left; top_logprobs 1 is one
    choice = sampler(temperature=0, repetition_penalty=10.0, logprobs=1)(LOGITS, [1])
    assert choice.token_id == 2
    assert choice.logprob == pytest.approx(float(expected[2]))
    assert choice.top == ((1, pytest.approx(float(expected[1]))),)


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_new_tokens": -1}, "max_new_tokens"),  # 0 is no reply (a prompt only scored)
    ],
)
def test_invalid_settings_are_named(kw, field):
    with pytest.raises(VicunaError, match=field):
        SamplingParams(**kw)


def test_on_the_cpu_tokens_are_drawn_from_the_distribution_by_a_seed_of_their_own():
    from vicuna.engine import kernel

    if kernel.load(progress=False) is None:
        pytest.skip("the kernel does not run here")
    logits = torch.tensor([0.0, math.log(3.0), -float("inf")])  # probabilities 1/4, 3/4, 0
    sampler = Sampler(SamplingParams(temperature=1.0, seed=11), prompt_len=0, end_ids=[], device=CPU)
    assert sampler.random is not None  # our kernel draws
    picks = [sampler(logits, []).token_id for _ in range(4000)]
    assert picks.count(2) == 0 and abs(picks.count(1) - 3000) < 5 * math.sqrt(4000 * 3 / 16)
    again = Sampler(SamplingParams(temperature=1.0, seed=11), prompt_len=0, end_ids=[], device=CPU)
    assert [again(logits, []).token_id for _ in range(200)] == picks[:200]


def test_a_negative_seed_draws_as_its_low_64_bits_not_as_its_absolute_value():
    """Python's `random` seeds with an integer's absolute value: on the CPU seed -5 drew what seed 5 drew,
    and a request's n choices (seed + index) repeated one another around 0; PyTorch's generator (a GPU)
    takes the low 64 bits, as now both do."""
    from vicuna.engine import kernel

    if kernel.load(progress=False) is None:
        pytest.skip("the kernel does not run here")
    flat = torch.zeros(1000)

    def draws(seed: int) -> list[int]:
        s = Sampler(SamplingParams(temperature=1.0, seed=seed), prompt_len=0, end_ids=[], device=CPU)
        assert s.random is not None  # our kernel draws
        return [s(flat, []).token_id for _ in range(20)]

    assert draws(-5) != draws(5)
    assert draws(-1) != draws(1)
    assert draws(-5) == draws(2**64 - 5)
    assert draws(2**64 + 5) == draws(5)


def test_seeds_differing_only_above_32_bits_draw_differently_on_the_cpu_without_the_kernel(monkeypatch):
    """PyTorch's CPU generator keeps only a seed's low 32 bits: without our kernel, seeds 5 and 2**32 + 5
    drew the same tokens on the CPU (on a GPU, and with the kernel, they differ). Seeds that fit in 32 bits
    draw as PyTorch's generator seeded with them, as before."""
    from vicuna.engine import kernel

    monkeypatch.setattr(kernel, "load", lambda progress=True: None)  # PyTorch's multinomial draws
    flat = torch.zeros(1000)

    def draws(seed: int) -> list[int]:
        s = Sampler(SamplingParams(temperature=1.0, seed=seed), prompt_len=0, end_ids=[], device=CPU)
        assert s.random is None
        return [s(flat, []).token_id for _ in range(20)]

    for seed in (0, 5, 2**31, 2**32 - 1):
        generator = torch.Generator().manual_seed(seed)
        assert draws(seed) == [
            int(torch.multinomial(flat.softmax(-1), 1, generator=generator)) for _ in range(20)
        ]
    drawn = {tuple(draws(seed)) for seed in (5, 2**32 + 5, 2**40 + 5, 2**63 + 5, 4, 2**32 + 4)}
    assert len(drawn) == 6
    assert draws(-5) == draws(2**64 - 5) != draws(5)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999, 1.0 - 1e-9])
def test_top_p_over_a_vocabulary_keeps_what_a_full_sort_keeps(p):
    """However many of the most likely tokens the nucleus needs (a few, or nearly all of them)."""
    generator = torch.Generator().manual_seed(int(p * 1000))
    for scale in (0.3, 3.0):
        logits = torch.randn(5000, generator=generator, dtype=torch.float64) * scale
        ranked, order = torch.sort(logits, descending=True)
        probs = ranked.softmax(-1)
        kept = order[probs.cumsum(-1) - probs < p]
        expected = torch.full_like(logits, float("-inf"))
        expected[kept] = logits[kept]
        assert torch.equal(top_p_filter(p)(logits.clone(), []), expected)


def test_top_p_is_the_nucleus_of_the_distribution_at_the_requested_temperature():
    """As in transformers, vLLM and FastChat: the temperature applies first. Probabilities 0.5, 0.3, 0.2
    at temperature 1 are 0.66, 0.24, 0.11 at 0.5, whose 0.6-nucleus is the first token alone."""
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    cold = sampler(temperature=0.5, top_p=0.6, seed=1)
    assert {cold(logits.clone(), [0, 0]).token_id for _ in range(300)} == {0}
    warm = sampler(temperature=1.0, top_p=0.6, seed=1)
    assert {warm(logits.clone(), [0, 0]).token_id for _ in range(300)} == {0, 1}
    before = logits.clone()
    cold(logits, [0, 0])
    assert torch.equal(logits, before)  # the caller's row is left as it was


def test_min_p_drops_tokens_less_likely_than_min_p_times_the_best():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = min_p_filter(0.2)(probs.log(), []).isfinite().tolist()  # 0.2 * 0.5 = 0.1: 0.05 is dropped
    assert kept == [True, True, True, False]
    # a draw at a high temperature never picks a dropped token; min_p 1 keeps only the best
    assert {sampler(temperature=2.0, min_p=0.5, seed=s)(LOGITS, [0]).token_id for s in range(40)} == {1, 2}
    assert {sampler(temperature=2.0, min_p=1.0, seed=s)(LOGITS, [0]).token_id for s in range(10)} == {1}
