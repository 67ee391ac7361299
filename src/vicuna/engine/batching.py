"""Continuous batching: one scheduler thread owns the model and steps every running reply together.

A request waits in a queue until there is room, is prefilled alone (so its prompt is computed exactly
as `Engine.generate` computes it), then joins the running batch at the next step; a reply that ends
leaves the batch at once. Each reply keeps its own `Sampler` (temperature, top-p, top-k, penalties,
seed, min tokens), its own incremental detokenizer and stop-string matcher, so a batch mixes settings
freely and yields the same `TextChunk`/`Finished` events as `Engine.generate`.

For LLaMA-architecture models the batch runs on the engine's fused weights: the rows share one KV cache
rectangle (`LlamaRunner`), and a step does every matrix product and every attention once for all rows;
a batch of one is exactly `Engine.generate`'s computation. Any other
model (or placement) batches through transformers on one left-padded `DynamicCache`. The KV memory of
the running rows is bounded by `kv_cache_tokens` (`vicuna serve --kv-cache-tokens`); when the next
step would not fit, the most recently admitted reply is preempted: its cache is dropped and it waits at
the head of the queue, to be recomputed from its prompt and the tokens it already has.

Batch invariance: in float32 a reply computed in a batch matches the reply computed alone except for
rounding in the last bits (matrix shapes change the summation order), which in practice leaves greedy
text unchanged (tested); in bfloat16/float16 those differences are larger and can flip
near-tied tokens, so batched text is not guaranteed to equal sequential text there.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import math
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from vicuna.config import SamplingParams
from vicuna.conversation import Message
from vicuna.engine.detok import IncrementalDecoder, StopMatcher
from vicuna.engine.engine import check_cancel, check_params, prompt_tokens
from vicuna.engine.events import Event, Finished, FinishReason, TextChunk, TokenLogprob, decode_rate
from vicuna.engine.memory import free_bytes, kv_values_per_token, release_memory_after
from vicuna.engine.runner import PREFILL_PIECE, LlamaRunner, cache_arg, chunked, decode, shared_prefix
from vicuna.engine.sampling import Sampler
from vicuna.errors import ShuttingDownError, VicunaError

log = logging.getLogger("vicuna.batching")

Sink = Callable[[Event | BaseException], None]

DEFAULT_MAX_BATCH_SIZE = 16
SWITCH_INTERVAL_S = 0.0002
DEFAULT_TOKENS_PER_SEQUENCE = 2048  # the default KV budget: this many tokens for each batch row
KV_SHARE = 0.8  # at most this share of the memory free after loading, by default (activations need some)


def release_openmp_threads() -> None:
    """End the OpenMP worker threads that the calling thread (the one that loaded the model) started.

    The scheduler thread starts a team of its own. With two teams alive libgomp manages more threads than
    there are cores, and then lets an idle worker spin only briefly before it sleeps: each parallel
    region (a decode step has ~150) waited for its worker to wake, measured +20 us a region, ~3 ms a
    token on 2 cores. OpenMP 5's `omp_pause_resource_all` frees the calling thread's team (a later
    parallel region there starts a new one). Where the runtime is not libgomp or lacks it, nothing is
    done."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libgomp.so.1").omp_pause_resource_all(1)  # omp_pause_soft


class _SwitchInterval:
    """The interpreter's switch interval, shortened to SWITCH_INTERVAL_S while any `Batcher` runs (see
    `Batcher.__init__`) and given back as it was when the last one ends: it is the whole process's, and a
    notebook that stopped its batcher would otherwise run every thread of its own at the batcher's."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.before = sys.getswitchinterval()

    def take(self) -> None:
        with self.lock:
            if not self.users:
                self.before = sys.getswitchinterval()
                sys.setswitchinterval(min(self.before, SWITCH_INTERVAL_S))
            self.users += 1

    def give_back(self) -> None:
        with self.lock:
            self.users -= 1
            if not self.users:
                sys.setswitchinterval(self.before)


_switch_interval = _SwitchInterval()


class _Either(threading.Event):
    """Set once set itself, or once `also` is."""

    def __init__(self, also: threading.Event) -> None:
        super().__init__()
        self.also = also

    def is_set(self) -> bool:
        return super().is_set() or self.also.is_set()


class _Reply:
    """One request's state: the same per-token logic as `Engine.generate`, fed logits by the scheduler."""

    def __init__(
        self, engine: Any, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event, sink: Sink
    ):
        self.engine, self.params, self.cancel, self.sink = engine, params, cancel, sink
        self.prompt_len = len(prompt_ids)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(engine.end_ids))
        self.sampler = Sampler(
            params, prompt_len=self.prompt_len, end_ids=sorted(self.stop_ids), device=engine.device
        )
        self.decoder, self.stops = IncrementalDecoder(engine.tokenizer, prompt_ids), StopMatcher(params.stop)
        self.history = list(prompt_ids)
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.done = False

    @property
    def completion_tokens(self) -> int:
        return len(self.history) - self.prompt_len

    def step(self, logits: torch.Tensor) -> bool:
        """Sample the next token from this reply's row of logits and emit its text; True when the reply ended."""
        choice = self.sampler(logits, self.history)
        self.history.append(choice.token_id)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        logprobs = self.engine.token_logprobs(choice) if self.params.logprobs is not None else None
        if choice.token_id in self.stop_ids:
            self.finish("stop", self.engine.tokenizer.convert_ids_to_tokens(choice.token_id), logprobs or ())
            return True
        quiet = self.completion_tokens < self.params.min_new_tokens
        text = self.stops.push(self.decoder.add(choice.token_id), quiet=quiet)
        self.sink(TextChunk(text, (choice.token_id,), logprobs))
        if self.stops.matched is not None:
            self.finish("stop", self.stops.matched)
        elif self.completion_tokens >= self.params.max_new_tokens:
            self.finish("length")
        return self.done

    def finish(
        self, reason: FinishReason, stop_text: str | None = None, stop_logprobs: tuple[TokenLogprob, ...] = ()
    ) -> None:
        if self.done:
            return
        self.done = True
        if self.stops.matched is None:  # text held back by the detokenizer or as a possible stop string
            # the text of the tokens so far: quiet if they are fewer than min_new_tokens (a reply cancelled)
            quiet = self.completion_tokens < self.params.min_new_tokens
            tail = self.stops.push(self.decoder.flush(), quiet=quiet)
            tail += "" if self.stops.matched is not None else self.stops.flush()
            if self.stops.matched is not None:
                reason, stop_text = "stop", self.stops.matched
            if tail:
                self.sink(TextChunk(tail, ()))
        end = time.perf_counter()
        first, n = self.first_token_at or end, self.completion_tokens
        self.sink(
            Finished(
                reason=reason,
                prompt_tokens=self.prompt_len,
                completion_tokens=n,
                ttft_s=first - self.start,
                decode_tokens_per_s=decode_rate(n, first, end),
                total_s=end - self.start,
                stop_text=stop_text,
                stop_logprobs=stop_logprobs,
            )
        )

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self.sink(error)


@dataclass
class BatchStats:
    """What the scheduler is doing now, and the most KV cache it ever held (for tests and /metrics)."""

    waiting: int = 0
    running: int = 0
    kv_tokens: int = 0
    peak_kv_tokens: int = 0
    peak_running: int = 0
    steps: int = 0
    preempted: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)  # rows per decode step


def check_settings(max_batch_size: int, stream_interval_s: float) -> None:
    """A `Batcher`'s settings, named by the flags that set them."""
    if max_batch_size < 1:
        raise VicunaError(f"--max-batch-size must be at least 1, not {max_batch_size}")
    if not stream_interval_s >= 0:
        raise VicunaError(
            f"--stream-interval must be 0 or more milliseconds, not {stream_interval_s * 1e3:g}"
        )


@dataclass
class _Prefill:
    """A prompt being computed in pieces: its reply, the row that holds its first `done` tokens of `ids`."""

    reply: _Reply
    row: Any
    ids: list[int]
    done: int
    resumed: bool  # a preempted reply, recomputed


class Batcher:
    """Serves many requests on one `Engine` with continuous batching.

    `generate`/`chat` have `Engine`'s signatures and yield the same events, so front ends take either.
    """

    def __init__(
        self,
        engine: Any,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        kv_cache_tokens: int | None = None,
        stream_interval_s: float = 0.0,
    ):
        check_settings(max_batch_size, stream_interval_s)
        self.engine = engine
        self.max_batch_size = max_batch_size
        # Each wake of a front end's thread for a reply's text costs CPU that on a small machine is taken
        # from decoding (see vicuna.server.app): with an interval, a reply's text made meanwhile is handed
        # over together (its first token and its end at once). 0: every token as it is made.
        self.stream_interval_s = stream_interval_s
        # By default DEFAULT_TOKENS_PER_SEQUENCE for each row, as far as KV_SHARE of the memory free once
        # the model is loaded holds them (16 rows of 2,048 tokens of a 7B model take 16 GiB: under load
        # they outgrew a 24 GB GPU, or a laptop's RAM), and never less than one full-length reply. On the
        # fused LLaMA path the rows share one cache tensor, which grows (and shrinks) by copying into a new
        # one, both held while it does: KV_SHARE holds the budget twice (the cache and the copy of it grew to
        # 1.5x the free memory, out of memory on a GPU, as the batch neared a budget of KV_SHARE once).
        wanted = max_batch_size * min(engine.context_window, DEFAULT_TOKENS_PER_SEQUENCE)
        copies = 2 if engine.llama_weights is not None else 1  # transformers' cache grows a layer at a time
        held = int(free_bytes(engine.device) * KV_SHARE) // (copies * self.kv_token_bytes)
        self.kv_cache_tokens = kv_cache_tokens or max(engine.context_window, min(wanted, held))
        self.kv_cut_to_memory = kv_cache_tokens is None and self.kv_cache_tokens < wanted
        if self.kv_cache_tokens < engine.context_window:
            raise VicunaError(
                f"--kv-cache-tokens {self.kv_cache_tokens} is smaller than the model's context window "
                f"({engine.context_window} tokens); one full-length reply must fit"
            )
        self.stats = BatchStats()
        release_openmp_threads()  # the scheduler thread's team should be the only one
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Reply] = collections.deque()
        self._tasks: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._closed = False
        self._replies: list[_Reply] = []  # the running batch, in admission order
        self._prefilling: _Prefill | None = None  # a prompt computed in pieces between decode steps
        self._held: list[tuple[Sink, Event | BaseException]] = []  # events not yet handed to their sinks
        self._handed_at: dict[Sink, float] = {}  # when each running reply's sink was last handed text
        # Held whenever sinks are called (the events of one hand-over): a front end that takes it sees all
        # of them, not the first few (the GIL may pass to its thread between two sinks).
        self.handing_over = threading.Lock()
        self._rows = self._new_rows()  # their KV caches and forward pass
        # The scheduler thread shares the GIL with the front end's threads (a server's event loop), and
        # takes it back after every kernel call; by default a thread holding it keeps it for up to 5 ms,
        # which stalled decoding behind the event loop's work on each streamed token. Given back as the
        # thread ends.
        _switch_interval.take()
        self._thread = threading.Thread(target=self._run, name="vicuna-batcher", daemon=True)
        self._thread.start()

    # --- the same face as Engine --------------------------------------------------------------

    def _new_rows(self) -> _LlamaRows | _HFRows:
        llama = self.engine.llama_weights  # the engine's fused LLaMA weights, when it has them
        if llama is None:
            return _HFRows(self.engine)
        return _LlamaRows(llama, self.max_batch_size, self.kv_cache_tokens, self.engine.context_window)

    @property
    def context_window(self) -> int:
        return self.engine.context_window

    @property
    def kv_token_bytes(self) -> int:
        """Keys and values of one token, all layers, at the model's dtype."""
        width = torch.finfo(self.engine.dtype).bits // 8 if self.engine.dtype.is_floating_point else 4
        return kv_values_per_token(self.engine.model.config) * width

    @property
    def kv_cache_bytes(self) -> int:
        """The KV cache's bound in bytes."""
        return self.kv_token_bytes * self.kv_cache_tokens

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, *, cancel: threading.Event | None = None
    ) -> Iterator[Event]:
        """Stream a reply like `Engine.generate`; raises ContextTooLongError here, before any event.

        The reply is computed on the scheduler thread whether or not it is read, so it is cancelled (its row
        freed) when the stream is let go (garbage-collected), read or not, or closed once read. A stream
        that something still holds goes on to its end: a notebook's variable, or a local variable of a
        frame that the traceback of an error keeps (`sys.last_traceback`); `close()` it. A `for` loop's
        own iterator is let go as an error leaves the loop."""
        check_cancel(cancel)
        events: queue.SimpleQueue[Event | BaseException] = queue.SimpleQueue()
        # The stream's own flag, set as it ends or is let go; the caller's `cancel` stops the reply too, but
        # is left as the caller set it, as `Engine.generate` leaves it: set at a stream's end, one event
        # given to several replies (a notebook's "stop all") cancelled the others as the first ended.
        cancel = _Either(cancel) if cancel is not None else threading.Event()
        self.add(prompt_ids, params, events.put, cancel=cancel)
        stream = self._drain(events, cancel)
        # A generator never started runs no `finally` when it is closed or collected: the reply, added
        # above, decoded to max_new_tokens in a row of the batch unread.
        weakref.finalize(stream, cancel.set)
        return stream

    submit = generate

    def chat(
        self, messages: Sequence[Message], params: SamplingParams, *, cancel: threading.Event | None = None
    ) -> Iterator[Event]:
        return self.generate(
            self.engine.encode_chat(messages), self.engine.chat_params(params), cancel=cancel
        )

    @staticmethod
    def _drain(events: queue.SimpleQueue, cancel: threading.Event) -> Iterator[Event]:
        try:
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:  # a consumer that stops reading frees the row
            cancel.set()

    # --- the scheduler's own interface ---------------------------------------------------------

    def add(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        sink: Sink,
        *,
        cancel: threading.Event | None = None,
    ) -> None:
        """Queue a request; `sink` receives its events (or an exception) on the scheduler thread, always
        while it holds `handing_over`, so it must be quick and thread-safe (e.g. `loop.call_soon_threadsafe`)."""
        check_params(params)
        prompt_ids = prompt_tokens(prompt_ids)  # as `Engine.generate` takes them: a tuple, a 1-D tensor
        self.engine.check_fits(len(prompt_ids), params.max_new_tokens)
        reply = _Reply(self.engine, prompt_ids, params, cancel or threading.Event(), self._outbox(sink))
        with self._lock:
            if self._closed:
                raise ShuttingDownError()
            self._waiting.append(reply)
            self.stats.waiting = len(self._waiting)
            self._lock.notify()

    def _outbox(self, sink: Sink) -> Sink:
        """A reply's events wait on the scheduler thread until `_hand_over`."""
        return lambda event: self._held.append((sink, event))

    def _hand_over(self, everything: bool = False) -> None:
        """Give the held events to their sinks. Called just before the model runs (a prefill, a decode step)
        and before the thread waits (`everything`), so that a front end's thread woken by an event (a
        server's event loop) finds the GIL free while the kernel runs. Handed over as they were made, in
        the middle of a step's Python, they woke the event loop to wait for the GIL and take it back and
        forth with this thread on every token: the API streamed at 0.95x the engine's own decode rate (mean
        of 18 pairs on a 2-core VM), 0.99x since.

        A reply's first text, its end and errors are handed over at once; later text when
        `stream_interval_s` has passed since the reply's sink was last handed text, all that was held
        with it (see `__init__`)."""
        now = time.perf_counter()
        held, self._held = self._held, []
        due = {
            sink
            for sink, event in held
            if everything
            or not isinstance(event, TextChunk)
            or now - self._handed_at.get(sink, -math.inf) >= self.stream_interval_s
        }
        with self.handing_over:
            for sink, event in held:
                if sink not in due:
                    self._held.append((sink, event))
                    continue
                sink(event)
                if isinstance(event, TextChunk):
                    self._handed_at[sink] = now
                else:  # the reply ended
                    self._handed_at.pop(sink, None)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the scheduler thread between two steps (the thread that owns the model)."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise ShuttingDownError()
            self._tasks.append((fn, future))
            self._lock.notify()
        return future

    def embed(self, token_lists: Sequence[list[int]], cancel: threading.Event | None = None) -> Future:
        """Mean-pooled, L2-normalised last hidden states, one vector per token list (a Future of them, or of
        None once `cancel` is set)."""
        return self._each(token_lists, lambda ids: self._embed([ids])[0], cancel)

    def score(
        self, token_lists: Sequence[list[int]], top: int, cancel: threading.Event | None = None
    ) -> Future:
        """`Engine.score` of each token list (a Future of them, or of None once `cancel` is set)."""
        return self._each(token_lists, lambda ids: self.engine.score(ids, top), cancel)

    def _each(self, token_lists: Sequence[list[int]], fn: Callable[[list[int]], Any], cancel) -> Future:
        """`fn` of each token list, on the scheduler thread: one list between two decode steps. All at once,
        a request of many stalled every running reply (and shutdown) until its last one, also after its
        client left."""
        for ids in token_lists:
            self.engine.check_fits(len(ids), 0)
        out: Future = Future()
        results: list[Any] = []

        def next_one(done: Future | None = None) -> None:  # on the scheduler thread, after the last one
            try:
                if done is not None:
                    results.append(done.result())
                if cancel is not None and cancel.is_set():
                    out.set_result(None)
                elif len(results) == len(token_lists):
                    out.set_result(results)
                else:
                    ids = token_lists[len(results)]
                    self.call(lambda: fn(ids)).add_done_callback(next_one)
            except BaseException as error:  # the model's error, or ShuttingDownError
                out.set_exception(error)

        next_one()
        return out

    @property
    def waiting(self) -> int:
        """Requests queued for a batch row (preempted ones included, and one whose prompt is being computed
        in pieces)."""
        return len(self._waiting) + (self._prefilling is not None)

    @property
    def running(self) -> int:
        return len(self._replies)

    @property
    def closed(self) -> bool:
        """Whether `stop` or `close` was called: requests are refused and running replies end "cancelled"."""
        return self._closed

    def stop(self) -> None:
        """Stop taking requests and end the running ones ("cancelled"), without waiting."""
        with self._lock:
            self._closed = True
            for reply in [*self._waiting, *self._replies]:
                reply.cancel.set()
            if self._prefilling is not None:
                self._prefilling.reply.cancel.set()
            self._lock.notify()

    def close(self, timeout: float | None = 10.0) -> None:
        """`stop`, and wait for the thread to end."""
        self.stop()
        self._thread.join(timeout)

    # `with Batcher(engine) as batcher:` closes it at the block's end, an error or Ctrl-C (a notebook's
    # interrupt) included: a batcher not closed keeps its thread, and the caches that thread holds
    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the scheduler thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._schedule()
        finally:
            _switch_interval.give_back()

    def _schedule(self) -> None:
        # this thread's kernel threads, sized from its steps' times (the fused LLaMA path on a CPU)
        self._team = self.engine.team() if isinstance(self._rows, _LlamaRows) else None
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (
                        self._waiting or self._tasks or self._replies or self._prefilling or self._closed
                    ):
                        self._lock.wait()
                    if self._closed and not (self._waiting or self._replies or self._prefilling):
                        break
                    tasks = list(self._tasks)
                    self._tasks.clear()
                if tasks:  # a task runs the model too (embeddings)
                    self._hand_over()
                for fn, future in tasks:
                    self._run_task(fn, future)
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self._replies:
                        self._decode_step()
                except Exception as error:  # a bug or out of memory: every running reply gets the error
                    log.exception("batch step failed")
                    for reply in self._replies:
                        reply.fail(error)
                    if self._prefilling is not None:
                        self._prefilling.reply.fail(error)
                    self._replies, self._rows, self._prefilling = [], self._new_rows(), None
                    release_memory_after(error)
                if not self._replies:  # nothing runs next: the thread may wait
                    self._hand_over(everything=True)
                self._update_stats()
        self._hand_over(everything=True)
        for _, future in self._tasks:
            future.set_exception(ShuttingDownError())

    @staticmethod
    def _run_task(fn: Callable[[], Any], future: Future) -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except Exception as error:
                future.set_exception(error)

    def _update_stats(self) -> None:
        s = self.stats
        s.waiting, s.running = self.waiting, len(self._replies)
        s.kv_tokens = self._rows.kv_tokens()
        s.peak_kv_tokens = max(s.peak_kv_tokens, s.kv_tokens)
        s.peak_running = max(s.peak_running, s.running)

    def _keep(self, keep: list[int], remember: bool = True) -> None:
        """Keep these rows; the others ended (or were cancelled), and the rows remember their caches for
        a next request that begins with their tokens (unless `remember` is False: preempted rows)."""
        if len(keep) != len(self._replies):
            if remember:
                kept = set(keep)
                for i, reply in enumerate(self._replies):
                    if i not in kept:
                        self._rows.remember(i, reply.history)
            self._replies = [self._replies[i] for i in keep]
            self._rows.keep(keep)

    def _drop_cancelled(self) -> None:
        # A request given up while it waited leaves the queue now, not when a row frees: until then it held
        # a place under the server's --max-queue (others got 429) and its state stayed in memory.
        with self._lock:
            given_up = [r for r in self._waiting if r.cancel.is_set()]
            if given_up:
                self._waiting = collections.deque(r for r in self._waiting if not r.cancel.is_set())
        for reply in given_up:
            reply.finish("cancelled")
        # after `stop`, every reply: one whose prompt was being computed then joined after `stop` cancelled
        # the others
        gone = {i for i, r in enumerate(self._replies) if r.cancel.is_set() or self._closed}
        for i in gone:
            self._replies[i].finish("cancelled")
        self._keep([i for i in range(len(self._replies)) if i not in gone])

    def _admit(self) -> None:
        """Prefill waiting requests while a row and the KV budget allow; each joins the batch. A prompt longer
        than `PREFILL_PIECE` is computed a piece per call, and those behind it wait."""
        if self._prefilling is not None and not self._prefill_more():
            return
        while len(self._replies) < self.max_batch_size:
            with self._lock:
                if not self._waiting:
                    return
                reply = self._waiting[0]
                if reply.cancel.is_set() or self._closed:
                    self._waiting.popleft()
                    reply.finish("cancelled")
                    continue
                if reply.params.max_new_tokens == 0:  # a prompt only echoed (and scored): nothing to compute
                    self._waiting.popleft()
                    reply.finish("length")
                    continue
                # A preempted reply is recomputed up to its last token, which the next step feeds.
                resumed = reply.completion_tokens > 0
                ids = reply.history[:-1] if resumed else reply.history
                if self._replies and self._rows.kv_tokens_with(len(ids)) > self.kv_cache_tokens:
                    return
                self._waiting.popleft()
            self._hand_over()
            try:
                row, logits, done = self._rows.prefill(ids, [r.history for r in self._replies], PREFILL_PIECE)
            except Exception as error:
                log.exception("prefill failed")
                reply.fail(error)
                release_memory_after(error)
                continue
            if done < len(ids):
                self._prefilling = _Prefill(reply, row, ids, done, resumed)
                return
            self._join(reply, row, logits, resumed)

    def _prefill_more(self) -> bool:
        """The next piece of the prompt being computed in pieces; True once it is done (the reply joined,
        ended or was cancelled)."""
        job = self._prefilling
        if job.reply.cancel.is_set() or self._closed:
            self._prefilling = None
            job.reply.finish("cancelled")
            return True
        self._hand_over()
        try:
            logits, job.done = self._rows.more(job.row, job.ids, job.done, PREFILL_PIECE)
        except Exception as error:
            log.exception("prefill failed")
            self._prefilling = None
            job.reply.fail(error)
            release_memory_after(error)
            return True
        if job.done < len(job.ids):
            return False
        self._prefilling = None
        self._join(job.reply, job.row, logits, job.resumed)
        return True

    def _join(self, reply: _Reply, row: Any, logits: torch.Tensor, resumed: bool) -> None:
        """A prefilled reply takes its first token (unless it was preempted, when it has it) and joins."""
        try:
            if not resumed and reply.step(logits):
                return
            self._rows.join(row)
        except Exception as error:  # out of memory growing the batch's cache: `_run` fails the batch, and
            reply.fail(error)  # this reply, in neither the batch nor `_prefilling`, with it
            raise
        self._replies.append(reply)

    def _preempt_to_fit(self) -> None:
        while len(self._replies) > 1 and self._rows.kv_tokens_after_step() > self.kv_cache_tokens:
            reply = self._replies[-1]
            self._keep(list(range(len(self._replies) - 1)), remember=False)
            with self._lock:
                self._waiting.appendleft(reply)
            self.stats.preempted += 1

    def _decode_step(self) -> None:
        self._preempt_to_fit()
        replies = self._replies
        self._hand_over()
        began = time.perf_counter()
        logits = self._rows.step([r.history[-1] for r in replies])
        if self._team is not None:
            self._team.timed(time.perf_counter() - began, len(replies))
        self.stats.steps += 1
        self.stats.batch_sizes[len(replies)] += 1
        ended = {i for i, reply in enumerate(replies) if reply.step(logits[i])}
        self._keep([i for i in range(len(replies)) if i not in ended])

    def _embed(self, token_lists: Sequence[list[int]]) -> list[list[float]]:
        base = self.engine.model.base_model
        out = []
        for ids in token_lists:
            hidden = (
                base(input_ids=torch.tensor([ids], device=self.engine.device)).last_hidden_state[0].float()
            )
            out.append(torch.nn.functional.normalize(hidden.mean(0), dim=0).tolist())
        return out


class _LlamaRows:
    """The batch on the engine's fused LLaMA weights: one `LlamaRunner` whose rows are the running
    replies. Each reply is prefilled alone, exactly as `Engine.generate` does, then joins it; a step runs
    every matrix product and every attention once for all rows. The rows share one rectangle of
    positions, as long as the longest row, which is what the KV budget counts. When the rectangle grows
    for a row, it makes room for as many rows again (up to the batch size and the budget), so that a
    wave of requests does not copy it once per row.

    A prompt that begins like a running row, or like a recently finished one (the next turn of a chat
    resends the whole conversation), starts from that row's cached positions. Finished rows are kept,
    most recent first, in what the KV budget leaves beside the batch, up to an eighth of it (at least
    one context window); the batch's rows always come first."""

    def __init__(self, weights: Any, max_rows: int, kv_cache_tokens: int, context_window: int) -> None:
        self.w, self.max_rows, self.kv_cache_tokens = weights, max_rows, kv_cache_tokens
        self.batch = LlamaRunner(weights, None)
        self.finished: list[tuple[LlamaRunner, list[int]]] = []  # one-row runners and their tokens
        self.finished_tokens = max(kv_cache_tokens // 8, chunked(context_window))

    def prefill(
        self, ids: list[int], histories: list[list[int]], most: int
    ) -> tuple[LlamaRunner, torch.Tensor, int]:
        """A runner for `ids` alone, the logits after its last computed token, and how many of `ids` it
        holds: no more than `most` beyond those it did not compute (`more` goes on).
        Where a running row (whose tokens are `histories[row]`) or a finished one begins the same way, its
        cached positions are copied (a finished row's runner is taken over) and only the rest of the
        prompt is computed."""
        limit = len(ids) - 1  # the last token is always computed: its logits are needed
        lengths = self.batch.lengths
        running = max(
            ((shared_prefix(h, ids, min(lengths[i], limit)), i) for i, h in enumerate(histories)),
            default=(0, -1),
        )
        finished = max(
            (
                (shared_prefix(tokens, ids, min(len(tokens), limit)), i)
                for i, (_, tokens) in enumerate(self.finished)
            ),
            default=(0, -1),
        )
        if finished[0] > running[0]:
            runner, _ = self.finished.pop(finished[1])
        else:
            runner = LlamaRunner(self.w, None)
            if running[0]:
                runner.copy_prefix(self.batch, running[1], running[0])
        return runner, *runner.prefill_more(ids, max(finished[0], running[0]), most)

    @staticmethod
    def more(runner: LlamaRunner, ids: list[int], done: int, most: int) -> tuple[torch.Tensor, int]:
        """Go on with a prompt `prefill` began: the next `most` of `ids` after `done`."""
        return runner.prefill_more(ids, done, most)

    def remember(self, row: int, history: list[int]) -> None:
        """Keep a copy of a row that is leaving (`history`: its tokens), for a prompt that begins the same way."""
        length = self.batch.lengths[row]
        if not length or length > self.finished_tokens:
            return
        runner = LlamaRunner(self.w, None)
        runner.copy_prefix(self.batch, row, length)
        self.finished.insert(0, (runner, history[:length]))
        self._fit(self.kv_tokens())

    def _fit(self, batch_tokens: int) -> None:
        """Drop the oldest finished rows while they would take more than their share, or more than the KV
        budget leaves beside the batch's `batch_tokens`."""
        room, total = min(self.finished_tokens, self.kv_cache_tokens - batch_tokens), 0
        for i, (runner, _) in enumerate(self.finished):
            total += runner.capacity
            if total > room:
                del self.finished[i:]
                return

    def join(self, runner: LlamaRunner) -> None:
        rows = self.batch.rows + 1
        width = max(self.batch.capacity, chunked(runner.lengths[0] + 1))
        self.batch.join(runner, slots=min(2 * rows, self.max_rows, self.kv_cache_tokens // width))
        self._fit(self.kv_tokens())

    def keep(self, index: list[int]) -> None:
        self.batch.keep(index)

    def kv_tokens(self) -> int:
        return self.batch.slots * self.batch.capacity

    def _tokens(self, rows: int, longest: int) -> int:
        return max(rows, self.batch.slots) * max(self.batch.capacity, chunked(longest))

    def kv_tokens_with(self, length: int) -> int:
        lengths = self.batch.lengths
        return self._tokens(len(lengths) + 1, max([length, *lengths]) + 1)

    def kv_tokens_after_step(self) -> int:
        lengths = self.batch.lengths
        return self._tokens(len(lengths), max(lengths, default=0) + 1)

    def step(self, tokens: list[int]) -> torch.Tensor:
        self._fit(self.kv_tokens_after_step())
        return decode(self.w, self.batch, tokens)


class _HFRows:
    """The batch for any transformers model (and any placement): one left-padded `DynamicCache`
    rectangle, rows x columns, with an attention mask and per-row positions."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.cache: Any = None
        self.cache_arg = cache_arg(engine.model)  # the name the model's forward takes the cache by
        self.mask: torch.Tensor | None = None  # (rows, columns): 1 where a column holds a real token

    def _columns(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def prefill(
        self, ids: list[int], histories: list[list[int]], most: int
    ) -> tuple[tuple[Any, int], torch.Tensor, int]:
        """The prompt alone, from its first token, all of it (`histories`, the running rows' tokens, are
        unused: these rows do not reuse each other's caches; nor are prompts computed in pieces)."""
        from transformers import DynamicCache

        # every position kept, sliding-window layers too (the model's mask applies the window): a sliding
        # layer keeps only the window's last positions, which would not line up with the rows' columns
        cache = DynamicCache()
        x = torch.tensor([ids], device=self.engine.device)
        logits = self.engine.model(input_ids=x, **{self.cache_arg: cache}, use_cache=True, logits_to_keep=1)
        logits = logits.logits[0, -1]
        return (cache, len(ids)), logits.float(), len(ids)

    def join(self, row: tuple[Any, int]) -> None:
        cache, length = row
        new_mask = torch.ones(1, length, dtype=torch.long, device=self.engine.device)
        if self.mask is None:
            self.cache, self.mask = cache, new_mask
            return
        columns = max(self._columns(), length)
        grow, pad = columns - self._columns(), columns - length
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, grow), _pad_left(theirs.keys, pad)])
            mine.values = torch.cat([_pad_left(mine.values, grow), _pad_left(theirs.values, pad)])
        self.mask = torch.cat([_pad_left(self.mask, grow, dim=1), _pad_left(new_mask, pad, dim=1)])

    def keep(self, index: list[int]) -> None:
        """Keep these rows, then drop the columns that are padding in every row left."""
        if not index:
            self.cache, self.mask = None, None
            return
        rows = torch.tensor(index, device=self.mask.device)
        mask = self.mask[rows]
        unused = int((mask.cumsum(1) == 0).all(0).sum())  # leading columns that no row uses
        self.mask = mask[:, unused:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[rows, :, unused:]
            layer.values = layer.values[rows, :, unused:]

    def remember(self, row: int, history: list[int]) -> None:
        """Nothing is kept of rows that leave (see `prefill`)."""

    def kv_tokens(self) -> int:
        return 0 if self.mask is None else self.mask.numel()

    def kv_tokens_with(self, length: int) -> int:
        rows = 0 if self.mask is None else self.mask.shape[0]
        return (rows + 1) * (max(self._columns(), length) + 1)

    def kv_tokens_after_step(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0] * (self._columns() + 1)

    def step(self, tokens: list[int]) -> torch.Tensor:
        model, n = self.engine.model, len(tokens)
        ids = torch.tensor(tokens, device=self.engine.device)[:, None]
        mask = torch.cat([self.mask, self.mask.new_ones(n, 1)], dim=1)
        cache = {self.cache_arg: self.cache, "use_cache": True}
        if bool(mask.all()):  # no padding: the plain call, as a batch of one is run alone
            out = model(input_ids=ids, **cache)
        else:
            positions = mask.sum(1, keepdim=True) - 1
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache)
        self.mask = mask
        return out.logits[:, -1].float()


def _pad_left(x: torch.Tensor, n: int, dim: int = -2) -> torch.Tensor:
    """`n` zero columns before the sequence dimension `dim` (which is -2 for keys and values)."""
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)
