"""Continuous batching on the tiny float32 engine: batched replies equal replies computed alone."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from dataclasses import replace

import pytest

from tests.tiny_models import plain_engine, tiny_config
from vicuna.config import SamplingParams
from vicuna.conversation import Message
from vicuna.engine.batching import SWITCH_INTERVAL_S, Batcher
from vicuna.engine.events import Finished, TextChunk
from vicuna.errors import ContextTooLongError, VicunaError

TEXTS = ["Hello world", "The capital of France", "你好，世界", "def add(x, y):", "A chat between", "Tokyo is"]


def reply(events) -> tuple[str, Finished]:
    events = list(events)
    assert isinstance(events[-1], Finished) and all(isinstance(e, TextChunk) for e in events[:-1])
    return "".join(e.text for e in events[:-1]), events[-1]


def hold_scheduler(batcher: Batcher, hold_s: float = 60, start_s: float = 60) -> threading.Event:
    """Hold the batcher's scheduler thread on a task of its own (it admits and steps nobody meanwhile)
    until the returned event is set, or `hold_s` has passed; returns once the hold has begun."""
    busy, release = threading.Event(), threading.Event()
    batcher.call(lambda: (busy.set(), release.wait(hold_s)))
    assert busy.wait(start_s)
    return release


def concurrently(
    batcher: Batcher, jobs: list[tuple[list[int], SamplingParams]]
) -> list[tuple[str, Finished]]:
    """Each job's reply, the jobs sent from threads of their own. The scheduler admits none until all of
    them wait: sent one by one, each could end before the next came (on a busy machine), run alone."""
    out: list = [None] * len(jobs)

    def run(i: int) -> None:
        out[i] = reply(batcher.generate(*jobs[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    release = hold_scheduler(batcher)
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while batcher.waiting < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        release.set()
    for t in threads:
        t.join(120)
    return out


def same(a: tuple[str, Finished], b: tuple[str, Finished]) -> bool:
    return a[0] == b[0] and (a[1].reason, a[1].completion_tokens) == (b[1].reason, b[1].completion_tokens)


@pytest.fixture
def batcher(tiny_engine):
    b = Batcher(tiny_engine, max_batch_size=8)
    yield b
    b.close()


def test_mixed_settings_in_one_batch_match_the_engine_alone(tiny_engine, batcher):
    e = tiny_engine
    greedy = SamplingParams(temperature=0, max_new_tokens=24)
    alone = reply(e.generate(e.encode(TEXTS[0]), replace(greedy, ignore_eos=True)))
    stop = alone[0][8:11]  # a stop string from the middle of a known reply
    jobs = [
        (e.encode(TEXTS[0]), replace(greedy, ignore_eos=True)),
        (e.encode(TEXTS[0]), replace(greedy, ignore_eos=True, stop=(stop,))),
        (e.encode(TEXTS[1]), SamplingParams(temperature=0.9, top_p=0.8, top_k=50, seed=3, max_new_tokens=20)),
        (e.encode(TEXTS[2]), SamplingParams(temperature=1.2, seed=11, max_new_tokens=16, min_new_tokens=16)),
        (
            e.encode(TEXTS[3]),
            replace(greedy, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
        ),
        (e.encode(TEXTS[4]), replace(greedy, max_new_tokens=5, logprobs=2)),
        # its first character as a stop string, before min_new_tokens: text, not the reply's end
        (e.encode(TEXTS[0]), replace(greedy, ignore_eos=True, stop=(alone[0][0],), min_new_tokens=12)),
    ]
    batched = concurrently(batcher, jobs)
    expected = [reply(e.generate(ids, params)) for ids, params in jobs]
    assert [same(b, x) for b, x in zip(batched, expected, strict=True)] == [True] * len(jobs)
    assert batched[0] == alone or same(batched[0], alone)
    # the stop string cut the same reply where it first appears, and never shows
    cut, finished = batched[1]
    assert finished.reason == "stop" and finished.stop_text == stop
    assert cut == alone[0][: alone[0].find(stop)] and stop not in cut
    assert batched[3][1].completion_tokens == 16  # min_tokens == max_tokens: no early end
    assert batched[5][1].completion_tokens == 5 and batched[5][1].reason == "length"
    assert batched[6][1].completion_tokens >= 12
    assert batcher.stats.peak_running > 1


def test_a_new_request_joins_the_running_batch(tiny_engine, batcher):
    e = tiny_engine
    long_job = (e.encode(TEXTS[0]), SamplingParams(temperature=0, max_new_tokens=300, ignore_eos=True))
    short_job = (e.encode(TEXTS[5]), SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True))
    # the long reply (~30 ms alone) takes no step past its fifth token until the short one is sent
    step, steps, sent = batcher._rows.step, itertools.count(1), threading.Event()
    batcher._rows.step = lambda tokens: (next(steps) < 5 or sent.wait(60), step(tokens))[1]
    events = batcher.generate(*long_job)
    chunks = []
    for event in events:
        chunks.append(event)
        if len(chunks) == 5:  # the long reply is running: send the short one now
            short_events = batcher.generate(*short_job)
            sent.set()
            short = reply(short_events)
    long_reply = ("".join(c.text for c in chunks[:-1]), chunks[-1])
    assert same(long_reply, reply(e.generate(*long_job)))
    assert same(short, reply(e.generate(*short_job)))
    assert batcher.stats.batch_sizes[2] >= 9  # the short reply's decode steps ran with the long one


def test_kv_cache_bound_preempts_and_recomputes(tiny_engine):
    e = tiny_engine
    b = Batcher(e, max_batch_size=4, kv_cache_tokens=e.context_window)
    try:
        jobs = [
            (e.encode(t), SamplingParams(temperature=0, max_new_tokens=300, ignore_eos=True))
            for t in TEXTS[:4]
        ]
        batched = concurrently(b, jobs)
        assert b.stats.preempted > 0
        assert 0 < b.stats.peak_kv_tokens <= e.context_window
        expected = [reply(e.generate(*job)) for job in jobs]
        assert all(same(x, y) for x, y in zip(batched, expected, strict=True))
    finally:
        b.close()


def test_the_default_kv_budget_holds_one_full_length_reply_for_any_batch_size(tiny_engine, monkeypatch):
    from vicuna.engine import batching

    # as the built-in model's 8192-token window with --max-batch-size 1-3: rows x 2048 is less than it
    monkeypatch.setattr(batching, "DEFAULT_TOKENS_PER_SEQUENCE", tiny_engine.context_window // 4)
    b = Batcher(tiny_engine, max_batch_size=2)
    try:
        assert b.kv_cache_tokens == tiny_engine.context_window
    finally:
        b.close()
    b = Batcher(tiny_engine, max_batch_size=8)
    try:
        assert b.kv_cache_tokens == 2 * tiny_engine.context_window
    finally:
        b.close()


def test_the_default_kv_budget_is_what_free_memory_holds(tiny_engine, monkeypatch):
    """16 rows of 2,048 tokens of a 7B model take 16 GiB: by default the budget was that whatever the GPU (or
    the RAM) had left after the model, so a busy server ran out of memory; it is now cut to KV_SHARE of it,
    never below one full-length reply. A budget given is kept."""
    from vicuna.engine import batching

    window, per_token = tiny_engine.context_window, None

    def budget(free_tokens: float, **kw) -> tuple[int, bool]:
        nonlocal per_token
        # what KV_SHARE of the free memory holds twice: the fused LLaMA path's cache grows by copying
        free = int(2 * free_tokens * per_token / batching.KV_SHARE)
        monkeypatch.setattr(batching, "free_bytes", lambda device: free)
        b = Batcher(tiny_engine, max_batch_size=4, **kw)
        b.close()
        return b.kv_cache_tokens, b.kv_cut_to_memory

    b = Batcher(tiny_engine, max_batch_size=4)
    per_token = b.kv_token_bytes
    b.close()
    assert b.kv_cache_bytes == per_token * b.kv_cache_tokens
    assert budget(10 * window) == (4 * window, False)  # room to spare: as ever
    assert budget(2.5 * window) == (int(2.5 * window), True)
    assert budget(window / 3) == (window, True)  # one full-length reply, whatever is free
    assert budget(window, kv_cache_tokens=3 * window) == (3 * window, False)


def test_the_kv_cache_fits_the_free_memory_while_it_grows(tiny_engine, monkeypatch):
    """The batch's rows share one cache tensor, which grows (and shrinks) by copying into a new one: with a
    budget of KV_SHARE of the free memory, the cache and its copy took 1.5x the free memory as a busy batch
    neared its budget (a GPU ran out of memory, and every running reply got 503). The caches alive at once,
    as each new one is made, must fit in what was free."""
    import weakref

    from vicuna.engine import batching, runner

    live, peak = weakref.WeakSet(), 0

    def tracked(name):
        method = getattr(runner.LlamaRunner, name)

        def call(self, *args, **kwargs):
            nonlocal peak
            old, held = self.cache, sum(t.nbytes for t in live)
            out = method(self, *args, **kwargs)
            if self.cache is not None and self.cache is not old:  # made while `old` was still there
                peak = max(peak, held + self.cache.nbytes)
                live.add(self.cache)
            return out

        monkeypatch.setattr(runner.LlamaRunner, name, call)

    for name in ("reserve", "keep"):
        tracked(name)
    window = tiny_engine.context_window
    b = Batcher(tiny_engine, max_batch_size=8)
    per_token = b.kv_token_bytes
    b.close()
    free = int(4 * window * per_token / batching.KV_SHARE)
    monkeypatch.setattr(batching, "free_bytes", lambda device: free)
    b = Batcher(tiny_engine, max_batch_size=8)
    params = SamplingParams(temperature=0, max_new_tokens=window - 300, ignore_eos=True)

    def reply(i: int) -> None:
        for _ in b.generate(tiny_engine.encode(TEXTS[i % len(TEXTS)] * (1 + i)), params):
            pass

    try:
        threads = [threading.Thread(target=reply, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        b.close()
    assert b.stats.preempted  # the batch reached its budget
    assert peak <= free, (peak / free, b.kv_cache_tokens)


def test_a_request_cancelled_while_it_waits_for_a_row_is_never_computed(tiny_engine, batcher, prefill_starts):
    """A client gone while its request waits (the batch full, or the scheduler busy) ends "cancelled"
    without its prompt computed; the request behind it is served."""
    cancel = threading.Event()
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    release = hold_scheduler(batcher)
    try:
        gone = batcher.generate(tiny_engine.encode(TEXTS[0]), params, cancel=cancel)
        served = batcher.generate(tiny_engine.encode(TEXTS[1]), params)
        cancel.set()
    finally:
        release.set()
    ended = reply(gone)[1]
    assert ended.reason == "cancelled" and ended.completion_tokens == 0
    assert reply(served)[1].completion_tokens == 8
    assert prefill_starts == [0]  # the served prompt's alone


def test_cancel_frees_the_row_at_once(tiny_engine, batcher):
    cancel, step, steps = threading.Event(), batcher._rows.step, itertools.count(1)
    # 900 tokens take ~0.1 s: past the third, the reply waits for the cancel, which a busy machine delays
    batcher._rows.step = lambda tokens: (next(steps) < 3 or cancel.wait(60), step(tokens))[1]
    params = SamplingParams(temperature=0, max_new_tokens=900, ignore_eos=True)
    events = batcher.generate(tiny_engine.encode(TEXTS[0]), params, cancel=cancel)
    for seen, event in enumerate(events):
        if isinstance(event, Finished):
            break
        if seen == 2:
            cancel.set()
    assert event.reason == "cancelled" and event.completion_tokens < 900
    deadline = time.monotonic() + 10
    while batcher.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.running == 0


def test_a_reply_whose_joining_the_batch_fails_gets_the_error_and_the_next_one_runs(tiny_engine, batcher):
    import queue

    def out_of_memory(row):  # e.g. the batch's cache growing for the new row
        raise MemoryError("simulated: no memory for the batch's cache")

    batcher._rows.join = out_of_memory
    events: queue.SimpleQueue = queue.SimpleQueue()
    batcher.add(tiny_engine.encode(TEXTS[0]), SamplingParams(temperature=0, max_new_tokens=8), events.put)
    event = events.get(timeout=60)  # its first token's text, then the error: not left waiting forever
    while isinstance(event, TextChunk):
        event = events.get(timeout=60)
    assert isinstance(event, MemoryError)
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    assert reply(batcher.generate(tiny_engine.encode(TEXTS[1]), params))[1].completion_tokens == 8


def test_a_reply_cancelled_before_min_new_tokens_is_not_stopped_by_its_held_back_text(
    tiny_engine, batcher, monkeypatch
):
    """As in the engine alone (tests/engine/test_engine.py): the detokenizer's leftover text of a reply
    cancelled within its first min_new_tokens tokens ended it "stop" at a stop string min_tokens holds back."""
    from tests.engine.test_engine import HeldBack
    from vicuna.engine import batching

    prompt = tiny_engine.encode(TEXTS[1])
    greedy = dict(temperature=0, max_new_tokens=900, ignore_eos=True)
    ids = [
        t for e in tiny_engine.generate(prompt, SamplingParams(**greedy)) for t in getattr(e, "token_ids", ())
    ]
    stop = tiny_engine.tokenizer.decode(ids[:3], skip_special_tokens=True).strip()
    assert stop
    monkeypatch.setattr(batching, "IncrementalDecoder", HeldBack)
    cancel, step, steps = threading.Event(), batcher._rows.step, itertools.count(1)
    batcher._rows.step = lambda tokens: (next(steps) < 3 or cancel.wait(60), step(tokens))[1]
    params = SamplingParams(**greedy, stop=[stop], min_new_tokens=600)
    events = batcher.generate(prompt, params, cancel=cancel)
    for seen, event in enumerate(events):
        if isinstance(event, Finished):
            break
        if seen == 2:
            cancel.set()
    assert event.reason == "cancelled" and event.completion_tokens < 600


def test_a_stop_string_completed_by_the_held_back_text_at_the_end_stops_the_reply(
    tiny_engine, batcher, monkeypatch
):
    """As in the engine alone (tests/engine/test_engine.py): a stop string completed only by the
    detokenizer's leftover text when the reply ends is a "stop", its text cut before the stop string."""
    from tests.engine.test_engine import HeldBack
    from vicuna.engine import batching

    prompt = tiny_engine.encode(TEXTS[1])
    greedy = dict(temperature=0, max_new_tokens=8, ignore_eos=True)
    events = list(tiny_engine.generate(prompt, SamplingParams(**greedy)))
    full, ids = "".join(e.text for e in events[:-1]), [t for e in events[:-1] for t in e.token_ids]
    stop = tiny_engine.tokenizer.decode(ids[3:5], skip_special_tokens=True).strip()
    assert stop and full.index(stop) > 0
    monkeypatch.setattr(batching, "IncrementalDecoder", HeldBack)
    text, done = reply(batcher.generate(prompt, SamplingParams(**greedy, stop=[stop])))
    assert (done.reason, done.stop_text, done.completion_tokens) == ("stop", stop, 8)
    assert text == full[: full.index(stop)]


def test_a_reply_whose_prompt_is_computed_when_the_batcher_stops_ends_cancelled(tiny_engine):
    b = Batcher(tiny_engine, max_batch_size=4)
    prefill = b._rows.prefill

    def stopping(*args):  # the server shuts down while this prompt is computed
        b.stop()
        return prefill(*args)

    b._rows.prefill = stopping
    params = SamplingParams(temperature=0, max_new_tokens=600, ignore_eos=True)
    try:
        finished = reply(b.generate(tiny_engine.encode(TEXTS[0]), params))[1]
    finally:
        b.close()
    assert finished.reason == "cancelled" and finished.completion_tokens < 600


@pytest.mark.parametrize("abandon", ["closed", "dropped unread"])
def test_an_abandoned_stream_is_cancelled(tiny_engine, batcher, abandon):
    # The reply takes no step before its stream is closed (alone, its 900 tokens take ~0.1 s), and how it
    # ended is asked of its sink: its 899 steps, had it run to the end, were fewer than 900 too.
    step, closed, add = batcher._rows.step, threading.Event(), batcher.add
    batcher._rows.step = lambda tokens: (closed.wait(60), step(tokens))[1]
    ends: list[Finished] = []
    ended = threading.Event()

    def noting_the_end(ids, params, sink, cancel):
        def note(event):
            sink(event)
            if isinstance(event, Finished):
                ends.append(event)
                ended.set()

        add(ids, params, note, cancel=cancel)

    batcher.add = noting_the_end
    params = SamplingParams(temperature=0, max_new_tokens=900, ignore_eos=True)
    events = batcher.generate(tiny_engine.encode(TEXTS[0]), params)
    if abandon == "closed":
        next(events)
        events.close()  # e.g. a web client that went away
    else:
        del events  # e.g. a notebook cell that failed between the call and its loop
    closed.set()
    assert ended.wait(60)
    assert ends[0].reason == "cancelled" and ends[0].completion_tokens < 900
    deadline = time.monotonic() + 10
    while (batcher.running or batcher.waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.running == 0


def test_one_cancel_event_given_to_several_replies_is_left_to_the_caller(tiny_engine, batcher):
    """README: a Batcher has the engine's `generate`, whose `cancel` stops a reply. One event given to several
    replies (a notebook's "stop all") was set by the batcher as the first of them ended, and so cancelled the
    others; `Engine.generate` sets no event of the caller's."""
    stop_all, ids = threading.Event(), tiny_engine.encode(TEXTS[0])
    longer = batcher.generate(
        ids, SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True), cancel=stop_all
    )
    short = batcher.generate(
        ids, SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True), cancel=stop_all
    )
    assert reply(short)[1].reason == "length"
    assert not stop_all.is_set()
    assert reply(longer)[1].reason == "length"
    stop_all.set()  # and the caller's event still stops a reply
    assert (
        reply(batcher.generate(ids, SamplingParams(max_new_tokens=40), cancel=stop_all))[1].reason
        == "cancelled"
    )


def test_the_switch_interval_is_given_back_when_the_last_batcher_ends(tiny_engine):
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.003)  # a notebook's own
    try:
        first, second = Batcher(tiny_engine), Batcher(tiny_engine)
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
        first.close()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)  # the second one still runs
        second.stop()
        second.close()  # after `stop`: given back once
        assert sys.getswitchinterval() == pytest.approx(0.003)
        third = Batcher(tiny_engine)
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
        third.close()
        assert sys.getswitchinterval() == pytest.approx(0.003)
    finally:
        sys.setswitchinterval(before)


def test_a_request_given_up_while_it_waits_leaves_the_queue_at_once(tiny_engine):
    b = Batcher(tiny_engine, max_batch_size=1)
    step = b._rows.step
    b._rows.step = lambda tokens: (time.sleep(0.005), step(tokens))[1]  # 900 tokens: 4.5 s
    params = SamplingParams(temperature=0, max_new_tokens=900, ignore_eos=True)
    try:
        running = b.generate(tiny_engine.encode(TEXTS[0]), params)
        next(running)
        cancel = threading.Event()
        waiting = b.generate(tiny_engine.encode(TEXTS[1]), params, cancel=cancel)
        assert b.waiting == 1
        cancel.set()  # its client left: its place in the queue is free for another, its row never taken
        assert reply(waiting)[1].reason == "cancelled"
        assert b.waiting == 0 and b.running == 1
    finally:
        b.close()


def test_every_event_reaches_its_sink_before_the_model_runs_again(tiny_engine, batcher, monkeypatch):
    """Events are handed over late, just before the next prefill, step or task (when the kernel frees the
    GIL for a front end's thread), but never held across a model call."""
    rows = type(batcher._rows)
    tokens_made, tokens_delivered, in_step = [0], [0], []
    # The first reply (~20 ms alone) takes no step past its third token until the task is queued, and none
    # after the task until the second reply is added: it runs on for both, however late they come.
    queued, checked, added = threading.Event(), threading.Event(), threading.Event()

    def holding() -> None:
        if tokens_made[0] >= 3:
            queued.wait(60)
        if checked.is_set():
            added.wait(60)

    for name in ("prefill", "step"):
        call = getattr(rows, name)

        def counted(self, *args, call=call, name=name):
            in_step.append(tokens_delivered[0] == tokens_made[0])
            if name == "step":
                holding()
            out = call(self, *args)
            tokens_made[0] += 1 if name == "prefill" else len(args[0])  # one token per row
            return out

        monkeypatch.setattr(rows, name, counted)
    done = [threading.Event(), threading.Event()]
    first_tokens = threading.Event()

    def sink(i: int):
        def take(event) -> None:
            if isinstance(event, TextChunk) and event.token_ids:
                tokens_delivered[0] += 1
                if tokens_delivered[0] == 3:
                    first_tokens.set()
            if isinstance(event, Finished):
                done[i].set()

        return take

    params = SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True)
    batcher.add(tiny_engine.encode(TEXTS[0]), params, sink(0))
    assert first_tokens.wait(60)

    def check() -> bool:  # a task runs the model too: what was made before it has been delivered
        checked.set()
        return tokens_delivered[0] == tokens_made[0]

    task = batcher.call(check)
    queued.set()
    assert task.result(60)
    batcher.add(tiny_engine.encode(TEXTS[1]), replace(params, max_new_tokens=6), sink(1))  # joins the batch
    added.set()
    assert done[0].wait(60) and done[1].wait(60)
    assert len(in_step) >= 200 and all(in_step)
    assert tokens_made[0] == tokens_delivered[0] == 206 and batcher.stats.peak_running == 2


def test_with_a_stream_interval_a_replys_later_text_is_handed_over_together(tiny_engine):
    """The first token at once, then the text made within the interval together (here: with the end)."""
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    ids = tiny_engine.encode(TEXTS[2])
    batcher = Batcher(tiny_engine, max_batch_size=8, stream_interval_s=3600)
    handed: list[tuple[int, object]] = []  # (decode steps run by then, event)
    done = threading.Event()

    def sink(event) -> None:
        handed.append((batcher.stats.steps, event))
        if isinstance(event, Finished):
            done.set()

    try:
        batcher.add(ids, params, sink)
        assert done.wait(60)
    finally:
        batcher.close()
    steps = [step for step, _ in handed]
    assert steps[0] == 0 and set(steps[1:]) == {
        11
    }  # the prefill's token before the first step; the rest at the end
    assert same(reply(event for _, event in handed), reply(tiny_engine.generate(ids, params)))
    with pytest.raises(VicunaError, match="--stream-interval"):
        Batcher(tiny_engine, stream_interval_s=-0.001)


def test_too_long_is_refused_before_any_event(tiny_engine, batcher):
    ids = tiny_engine.encode(TEXTS[0])
    with pytest.raises(ContextTooLongError) as info:
        batcher.generate(ids, SamplingParams(max_new_tokens=tiny_engine.context_window))
    assert str(tiny_engine.context_window) in str(info.value)
    with pytest.raises(VicunaError, match="kv-cache-tokens"):
        Batcher(tiny_engine, kv_cache_tokens=10)


def test_chat_uses_the_template_stops(tiny_engine, batcher):
    from vicuna.conversation import Message

    messages = [Message("user", "Hello")]
    params = SamplingParams(temperature=0, max_new_tokens=12)
    assert same(reply(batcher.chat(messages, params)), reply(tiny_engine.chat(messages, params)))


def test_embeddings_are_normalised_mean_pools(tiny_engine, batcher):
    import torch

    a, b, a2 = batcher.embed(
        [tiny_engine.encode("Hello"), tiny_engine.encode("Tokyo is big"), tiny_engine.encode("Hello")]
    ).result(60)
    hidden = tiny_engine.model.config.hidden_size
    assert len(a) == hidden and a == a2 and a != b
    assert abs(float(torch.tensor(b).norm()) - 1) < 1e-5


def test_any_transformers_model_batches_on_a_padded_cache(tiny_engine):
    """Without the fused LLaMA path (other architectures, several GPUs) the batch is a left-padded
    transformers cache; replies still equal the engine's, under preemption too."""
    e = plain_engine(tiny_engine)
    b = Batcher(e, max_batch_size=4, kv_cache_tokens=e.context_window)
    try:
        jobs = [
            (e.encode(TEXTS[0]), SamplingParams(temperature=0, max_new_tokens=380, ignore_eos=True)),
            (e.encode(TEXTS[1]), SamplingParams(temperature=0, max_new_tokens=370, ignore_eos=True)),
            (
                e.encode(TEXTS[2]),
                SamplingParams(temperature=0.8, seed=5, max_new_tokens=360, ignore_eos=True),
            ),
            (e.encode(TEXTS[3]), SamplingParams(temperature=0, max_new_tokens=20, stop=("x",))),
        ]
        batched = concurrently(b, jobs)
        expected = [reply(e.generate(*job)) for job in jobs]
        assert all(same(x, y) for x, y in zip(batched, expected, strict=True))
        assert b.stats.preempted > 0 and b.stats.peak_kv_tokens <= e.context_window
        assert b.stats.peak_running > 1
    finally:
        b.close()


def test_a_model_with_a_sliding_window_batches_prompts_longer_than_the_window(tiny_engine):
    """Mistral-style sliding-window attention: transformers' sliding cache layers keep only the window's last
    positions, which the padded rectangle cannot line up; the batch keeps them all, as its mask counts."""
    import torch
    from transformers import AutoModelForCausalLM

    from vicuna.engine.engine import Engine

    config = tiny_config("mistral", len(tiny_engine.tokenizer), max_position_embeddings=512)  # a window of 16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    e = Engine(model=model, tokenizer=tiny_engine.tokenizer, template=tiny_engine.template, model_name="m")
    first, second = [
        (
            e.encode(TEXTS[i] + " " + TEXTS[i + 1] * 3),
            SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True),
        )
        for i, n in ((0, 200), (2, 12))
    ]
    assert min(len(first[0]), len(second[0])) > 2 * config.sliding_window
    b = Batcher(e, max_batch_size=2)
    step, added = b._rows.step, threading.Event()
    # the first reply takes no step before the second is queued: it cannot end before the second joins
    b._rows.step = lambda tokens: (added.wait(60), step(tokens))[1]
    try:
        events = b.generate(*first)
        started = next(events)  # running when the second joins
        later = b.generate(*second)
        added.set()
        batched = [reply([started, *events]), reply(later)]
    finally:
        b.close()
    assert b.stats.peak_running == 2
    assert same(batched[0], reply(e.generate(*first))) and same(batched[1], reply(e.generate(*second)))


def test_a_long_prompt_is_computed_in_pieces_between_the_running_replies_steps(tiny_engine, monkeypatch):
    from vicuna.engine import batching

    monkeypatch.setattr(batching, "PREFILL_PIECE", 32)
    b = Batcher(tiny_engine, max_batch_size=4)
    rows = b._rows
    step, more, added = rows.step, rows.more, threading.Event()
    # the running reply takes no step before the long prompt is queued: it runs while that is computed
    rows.step = lambda tokens: (added.wait(60), step(tokens))[1]
    pieces: list[tuple[int, int]] = []  # (decode steps so far, tokens of the prompt done) at each piece
    rows.more = lambda runner, ids, done, most: (
        pieces.append((b.stats.steps, done)),
        more(runner, ids, done, most),
    )[1]
    running_job = (
        tiny_engine.encode(TEXTS[0]),
        SamplingParams(temperature=0, max_new_tokens=400, ignore_eos=True),
    )
    long_ids = tiny_engine.encode(" ".join(TEXTS) * 6)
    assert len(long_ids) > 6 * 32
    long_job = (long_ids, SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))
    try:
        events = b.generate(*running_job)
        first = next(events)
        long_events = b.generate(*long_job)
        added.set()
        long_reply, running_reply = reply(long_events), reply([first, *events])
    finally:
        b.close()
    dones = [done for _, done in pieces]  # the first piece began after the prefix shared with the running row
    assert len(dones) >= 5 and dones == list(
        range(dones[0], len(long_ids), 32)
    )  # a piece a call after the first
    assert all(
        later > earlier for (earlier, _), (later, _) in zip(pieces, pieces[1:], strict=False)
    )  # steps between
    assert same(long_reply, reply(tiny_engine.generate(*long_job)))
    assert same(running_reply, reply(tiny_engine.generate(*running_job)))


def test_a_prompt_being_computed_in_pieces_can_be_cancelled(tiny_engine, monkeypatch):
    import threading

    from vicuna.engine import batching

    monkeypatch.setattr(batching, "PREFILL_PIECE", 16)
    b = Batcher(tiny_engine, max_batch_size=4)
    rows = b._rows
    more, cancel = rows.more, threading.Event()
    calls: list[int] = []

    def cancelling_more(runner, ids, done, most):  # the client leaves during the second piece
        calls.append(done)
        if len(calls) == 2:
            cancel.set()
        return more(runner, ids, done, most)

    rows.more = cancelling_more
    try:  # no other reply runs: the prompt is computed in pieces all the same
        long_ids = tiny_engine.encode(" ".join(TEXTS) * 6)
        cancelled = reply(b.generate(long_ids, SamplingParams(max_new_tokens=8), cancel=cancel))
    finally:
        b.close()
    assert cancelled[1].reason == "cancelled" and cancelled[1].completion_tokens == 0
    assert len(calls) == 2  # no piece after the cancel


@pytest.mark.parametrize("failing", ["prefill", "more"])
def test_a_prompt_whose_computing_fails_gets_the_error_and_the_batch_goes_on(
    tiny_engine, monkeypatch, failing
):
    """Out of memory on a long prompt (its first piece, or a later one) fails that request alone: the reply
    already running ends as it would have, and the next request is served."""
    import queue

    from vicuna.engine import batching

    monkeypatch.setattr(batching, "PREFILL_PIECE", 16)
    b = Batcher(tiny_engine, max_batch_size=4)
    rows, long_ids = b._rows, tiny_engine.encode(" ".join(TEXTS) * 6)
    real, failures = getattr(rows, failing), [1]

    def out_of_memory(*args):
        if len(args[-3]) == len(long_ids) and failures:  # (ids, histories, most), (runner, ids, done, most)
            failures.pop()
            raise MemoryError("simulated: no memory for the prompt's activations")
        return real(*args)

    setattr(rows, failing, out_of_memory)
    step, added = rows.step, threading.Event()  # the running reply waits in the batch for the long prompt
    rows.step = lambda tokens: (added.wait(60), step(tokens))[1]
    running_job = (
        tiny_engine.encode(TEXTS[0]),
        SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True),
    )
    failed: queue.SimpleQueue = queue.SimpleQueue()
    try:
        events = b.generate(*running_job)
        first = next(events)
        b.add(long_ids, SamplingParams(temperature=0, max_new_tokens=8), failed.put)
        added.set()
        event = failed.get(timeout=60)  # the error, not a wait for ever
        assert isinstance(event, MemoryError) and not failures
        running_reply = reply([first, *events])
        after = reply(
            b.generate(tiny_engine.encode(TEXTS[1]), SamplingParams(temperature=0, max_new_tokens=8))
        )
    finally:
        b.close()
    assert same(running_reply, reply(tiny_engine.generate(*running_job)))
    assert after[1].completion_tokens > 0 and b.running == 0 and b.waiting == 0


def test_the_padded_cache_path_passes_its_cache_by_the_name_the_model_takes(tiny_engine):
    """Earlier transformers 5 releases take the cache as `past_key_values`: under the wrong name the prompt
    would be forgotten after its first token."""
    import torch

    from vicuna.engine.runner import cache_arg

    plain = tiny_engine.model

    class EarlierNames(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.plain, self.config, self.generation_config = plain, plain.config, plain.generation_config

        def forward(self, input_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0, **rest):
            # by the name of the transformers installed: any release that `pyproject.toml` allows
            cache = {cache_arg(self.plain): past_key_values}
            return self.plain(input_ids=input_ids, use_cache=use_cache, **cache, **rest)

    engines = [plain_engine(tiny_engine, m) for m in (plain, EarlierNames())]
    jobs = [
        (engines[0].encode(t), SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
        for t in TEXTS[:2]
    ]
    expected = [reply(engines[0].generate(*job)) for job in jobs]
    b = Batcher(engines[1], max_batch_size=2)
    try:
        assert all(same(x, y) for x, y in zip(concurrently(b, jobs), expected, strict=True))
    finally:
        b.close()


def test_a_request_that_begins_like_a_running_one_copies_its_cache(tiny_engine, batcher, prefill_starts):
    e, starts = tiny_engine, prefill_starts
    params = SamplingParams(temperature=0, max_new_tokens=64, ignore_eos=True)
    system = e.encode("A chat between a curious user and an assistant. USER: ")
    prompts = [system + e.encode(t)[1:] for t in ("Hello world", "Hello world", "Tokyo is")]
    alone = [reply(e.generate(ids, params)) for ids in prompts]
    starts.clear()
    events: list[list] = [[], [], []]
    started, added = [threading.Event() for _ in prompts], [threading.Event() for _ in prompts]
    # each joins while the first is still running: a step of n rows waits until the n+1st prompt is added
    step = batcher._rows.step
    batcher._rows.step = lambda tokens: (
        len(tokens) >= len(prompts) or added[len(tokens)].wait(60),
        step(tokens),
    )[1]
    for i, ids in enumerate(prompts):
        batcher.add(ids, params, lambda event, i=i: events[i].append(event) or started[i].set())
        added[i].set()
        assert started[i].wait(60)
    deadline = time.monotonic() + 60
    while not all(es and isinstance(es[-1], Finished) for es in events) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(same(reply(es), a) for es, a in zip(events, alone, strict=True))
    # the first computed its whole prompt; the same prompt again only its last token; the third what
    # follows the beginning it shares with them
    assert starts == [0, len(prompts[1]) - 1, len(system)]


def test_the_next_turn_of_a_chat_starts_from_the_finished_reply_cache(tiny_engine, batcher, prefill_starts):
    e, starts = tiny_engine, prefill_starts
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    first = e.encode("Hello world")
    _, done = reply(batcher.generate(first, params))
    finished = batcher.call(lambda: list(batcher._rows.finished)).result(30)  # after the row left
    tokens = finished[0][1]
    assert len(tokens) == len(first) + done.completion_tokens - 1  # the last token was never fed back
    second = tokens + e.encode("And then?")[1:]
    text = reply(batcher.generate(second, params))
    assert starts == [0, len(tokens)]
    finished = batcher.call(lambda: list(batcher._rows.finished)).result(30)
    assert len(finished) == 1  # taken over, then kept again with the second turn's tokens
    e.forget()
    assert same(text, reply(e.generate(second, params)))  # the same turn computed from scratch


def test_finished_rows_keep_within_their_share_of_the_kv_budget(tiny_engine, batcher):
    e = tiny_engine
    params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
    batcher._rows.finished_tokens = 256  # one cache chunk: only the most recent row fits
    for text in TEXTS[:3]:
        reply(batcher.generate(e.encode(text), params))
    [(runner, tokens)] = batcher.call(lambda: list(batcher._rows.finished)).result(30)
    assert tokens == e.encode(TEXTS[2]) + tokens[len(e.encode(TEXTS[2])) :] and runner.capacity == 256
    batcher.call(lambda: batcher._rows._fit(batcher.kv_cache_tokens)).result(30)  # a batch needing it all
    assert batcher._rows.finished == []


def test_the_loading_thread_releases_its_openmp_team_and_torch_still_runs_there(tiny_engine, monkeypatch):
    import torch

    from vicuna.engine import batching

    released = []
    release = batching.release_openmp_threads
    monkeypatch.setattr(batching, "release_openmp_threads", lambda: released.append(True) or release())
    b = Batcher(tiny_engine, max_batch_size=2)
    try:
        assert released == [True]
        threads = torch.get_num_threads()
        x = torch.randn(256, 256)  # this thread starts a team again
        torch.testing.assert_close(x @ x, (x.double() @ x.double()).float(), atol=1e-3, rtol=1e-4)
        assert torch.get_num_threads() == threads
        params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
        assert reply(b.generate(tiny_engine.encode("Hello"), params))[1].completion_tokens == 4
    finally:
        b.close()


@pytest.mark.gpu
def test_on_a_gpu_batched_greedy_replies_match_each_alone(tmp_path_factory):
    """The batch's steps are replayed from CUDA graphs, recorded again as rows join and leave."""
    from tests.tiny_models import write_tiny_llama
    from vicuna.config import ModelSettings
    from vicuna.engine.loader import load_engine

    folder = write_tiny_llama(
        tmp_path_factory.mktemp("tiny-gpu") / "tiny-llama", max_position_embeddings=1024
    )
    e = load_engine(ModelSettings(model_path=str(folder), device="cuda", dtype="float32"), progress=False)
    jobs = [
        (e.encode(text), SamplingParams(temperature=0, max_new_tokens=8 + 4 * i, ignore_eos=True))
        for i, text in enumerate(TEXTS)
    ]
    b = Batcher(e, max_batch_size=8)
    try:
        batched = concurrently(b, jobs)
    finally:
        b.close()
    expected = [reply(e.generate(ids, params)) for ids, params in jobs]
    assert [same(x, y) for x, y in zip(batched, expected, strict=True)] == [True] * len(jobs)
    assert b.stats.peak_running > 1


def test_many_embeddings_leave_the_running_replies_going_and_stop_once_cancelled(tiny_engine, batcher):
    computed: list[int] = []  # the lists computed at each turn of the scheduler
    embed, cancel = batcher._embed, threading.Event()
    # past the 100th list, none before the cancel: the 12-token reply ends by the 12th; alone, the 5000 take
    # ~3.5 s, which a test thread held up that long let end first
    batcher._embed = lambda lists: (
        computed.append(len(lists)),
        len(computed) <= 100 or cancel.wait(60),
        embed(lists),
    )[2]
    vectors = batcher.embed([tiny_engine.encode("Hello")] * 5000, cancel)
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    events = list(batcher.generate(tiny_engine.encode("Hi"), params))
    assert events[-1].completion_tokens == 12 and not vectors.done()  # the reply did not wait for them
    cancel.set()
    assert vectors.result(60) is None
    assert set(computed) == {1} and len(computed) < 5000
    few = batcher.embed([tiny_engine.encode("Hello"), tiny_engine.encode("Tokyo")]).result(60)
    assert [len(v) for v in few] == [tiny_engine.model.config.hidden_size] * 2


def test_the_batcher_takes_and_refuses_a_prompt_s_ids_as_the_engine_does(tiny_engine, batcher):
    """README: a Batcher has the engine's `generate`; it failed on a 1-D tensor of ids the engine takes, and
    on text with the runner's "'str' object cannot be interpreted as an integer"."""
    import torch

    e = tiny_engine
    ids, params = e.encode(TEXTS[0]), SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    alone = reply(e.generate(ids, params))
    for given in (tuple(ids), torch.tensor(ids)):
        assert same(reply(batcher.generate(given, params)), alone)
    with pytest.raises(TypeError, match=r"token ids, not text: engine.encode\(text\) gives them"):
        batcher.generate(TEXTS[0], params)
    with pytest.raises(TypeError, match=r"one sequence of token ids"):
        batcher.generate(torch.tensor([ids]), params)
    with pytest.raises(VicunaError, match="the prompt is empty: at least one token is needed"):
        batcher.generate([], params)


def test_settings_given_to_the_batcher_as_a_dict_are_told_to_be_sampling_params(tiny_engine, batcher):
    with pytest.raises(TypeError, match=r"SamplingParams\(\*\*d\)"):
        batcher.generate(tiny_engine.encode(TEXTS[0]), {"temperature": 0})
    with pytest.raises(TypeError, match=r"SamplingParams\(\*\*d\)"):
        batcher.chat([Message("user", "Hi")], {"temperature": 0})


def test_a_cancel_given_to_the_batcher_that_is_no_event_is_a_clear_error(tiny_engine, batcher):
    with pytest.raises(TypeError, match=r"cancel must be a threading.Event\(\)"):
        batcher.generate(tiny_engine.encode(TEXTS[0]), SamplingParams(max_new_tokens=2), cancel=True)


def test_a_batcher_in_a_with_block_is_closed_at_its_end_interrupted_too(tiny_engine):
    params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
    with Batcher(tiny_engine) as batcher:
        assert reply(batcher.generate(tiny_engine.encode(TEXTS[0]), params))[1].completion_tokens == 4
    assert batcher.closed and not batcher._thread.is_alive()
    with pytest.raises(KeyboardInterrupt), Batcher(tiny_engine) as interrupted:
        raise KeyboardInterrupt
    assert interrupted.closed and not interrupted._thread.is_alive()
