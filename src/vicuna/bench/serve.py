"""`vicuna bench serve`: aggregate tokens/s and time-to-first-token p50/p99 of a `vicuna serve` (started here
as a subprocess, or one already running at `--url`) under 1, 4, 16 and 64 concurrent streaming requests.

Baselines measured in the same run: one stream for the concurrency levels, and the engine called directly
in this process (same prompt, same greedy settings) for the API's single-stream figures, each engine
reply followed at once by one through the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from vicuna.bench.report import Report, check_reply_fits, median, model_info, percentile
from vicuna.config import ModelSettings
from vicuna.errors import VicunaError

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
_requests = itertools.count()


def prompt() -> str:
    """The benchmark's request, numbered: no two requests are the same text, as with real users, so the
    server's reuse of cached prompts only finds what they really share (the template and system prompt)."""
    return f"Request {next(_requests)}. {PROMPT}"


STREAMS_TARGET = {16: 6.0}  # the target: 16 streams >= 6x one stream's aggregate tokens/s
API_TARGET = 0.95
# Pairs per run of (the engine directly, then one stream through the API), for the API figures: on a
# noisy 2-core VM one such pair's ratio moved by +-10% from one minute to the next, so a run takes several.
API_PAIRS = 3
# A reply's decode rate needs its text to arrive in at least this many reads: the server sends a reply's text
# at most every 20 ms (`vicuna serve --stream-interval`), so a short or fast reply comes in one or two writes,
# all but the first token at once, and tokens / (last arrival - first) would be a rate of the network.
MIN_CONTENT_READS = 4
KEY_HINT = "pass its key with --api-key (default: the first of $VICUNA_API_KEYS)"


@dataclass(frozen=True)
class StreamResult:
    """One streamed request as the client saw it."""

    ttft_s: float  # request sent to first content
    total_s: float  # request sent to the end of the stream
    tokens: int  # completion tokens (from the usage the server sends last)
    # tokens after the first, per second from the first content to the last; None when the text came in
    # fewer than MIN_CONTENT_READS reads (too few arrivals to time)
    decode_tokens_per_s: float | None
    content_reads: int | None = None  # reads that brought content (None: not through the API)


@dataclass(frozen=True)
class Wave:
    """`streams` requests sent at once: the aggregate rate over the wave's wall time and TTFT percentiles."""

    streams: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    decode_p50_tokens_per_s: float | None  # over the replies that have a decode rate; None if none has


def sse_payloads(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a server-sent-events stream, up to `data: [DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def summarize_wave(streams: int, results: list[StreamResult], wall_s: float) -> Wave:
    tokens = sum(r.tokens for r in results)
    ttfts = [r.ttft_s for r in results]
    rates = [r.decode_tokens_per_s for r in results if r.decode_tokens_per_s is not None]
    return Wave(
        streams=streams,
        wall_s=wall_s,
        tokens=tokens,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        decode_p50_tokens_per_s=median(rates) if rates else None,
    )


def request_body(model: str, new_tokens: int) -> dict[str, Any]:
    """Greedy, exactly `new_tokens` tokens (vLLM's `min_tokens`/`ignore_eos` extras, which the server takes)."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt()}],
        "max_tokens": new_tokens,
        "min_tokens": new_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class _Stream(asyncio.Protocol):
    """One streamed request on a connection of its own, its response parsed by httptools (uvicorn's C HTTP
    parser). Client and server share the machine's cores here, so what the client spends per streamed
    token is taken from the server being measured: ~0.14 ms of CPU a token with aiohttp on uvloop on 2
    cores, ~0.06 ms so (httpx's pure-Python parser: ~1.3 ms)."""

    def __init__(self, request: bytes, start: float) -> None:
        import httptools

        self.request, self.start = request, start
        self.parser = httptools.HttpResponseParser(self)
        self.parser_error = httptools.HttpParserError
        self.result: asyncio.Future[StreamResult] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.pending = b""  # the start of an event not yet ended by a blank line
        self.error = bytearray()  # the body of an answer other than 200
        self.first: float | None = None
        self.last: float | None = None
        self.tokens: int | None = None
        self.read_at = 0.0  # when the data being parsed arrived
        self.content_reads = 0  # reads that brought content: the text of a write or of several together

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.read_at = time.perf_counter()
        try:
            self.parser.feed_data(data)
        except self.parser_error as err:
            self.fail(f"an answer that is not HTTP ({err})")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.status != 200:
            self.error += body
            return
        *events, self.pending = (self.pending + body).split(b"\n\n")
        try:
            for payload in sse_payloads(b"\n".join(events).decode().splitlines()):
                if any(c.get("delta", {}).get("content") for c in payload.get("choices", [])):
                    if self.last != self.read_at:  # the first content of this read
                        self.content_reads += 1
                    self.last = self.read_at
                    self.first = self.first or self.last
                if payload.get("usage"):
                    self.tokens = payload["usage"]["completion_tokens"]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            self.fail(f"a stream event that is not a chat completion chunk ({err!r})")

    def on_message_complete(self) -> None:
        end = time.perf_counter()
        self.transport.close()
        if self.status == 401:
            self.fail(f"answered 401 (no API key, or not one it takes): {KEY_HINT}")
        elif self.status != 200:
            self.fail(f"answered {self.status}: {self.error.decode(errors='replace')[:500]}")
        elif self.first is None or self.last is None or self.tokens is None:
            self.fail("the stream ended without content or without usage")
        elif not self.result.done():
            tokens, first, last = self.tokens, self.first, self.last
            timed = self.content_reads >= MIN_CONTENT_READS and tokens > 1 and last > first
            self.result.set_result(
                StreamResult(
                    ttft_s=first - self.start,
                    total_s=end - self.start,
                    tokens=tokens,
                    decode_tokens_per_s=(tokens - 1) / (last - first) if timed else None,
                    content_reads=self.content_reads,
                )
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"the connection closed before the answer ended ({exc or 'by the server'})")

    def fail(self, why: str) -> None:
        if not self.result.done():
            self.result.set_exception(VicunaError(f"/v1/chat/completions: {why}"))
            self.transport.close()


async def stream_one(
    url: str, body: dict[str, Any], timeout: float = 300, api_key: str | None = None
) -> StreamResult:
    """One streamed chat completion: times from sending the request to its first and last content."""
    import ssl

    parts = urlsplit(url)
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (
        f"POST {parts.path}/v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    start = time.perf_counter()
    loop = asyncio.get_running_loop()
    try:
        _, stream = await asyncio.wait_for(
            loop.create_connection(
                lambda: _Stream(head.encode() + data, start),
                parts.hostname,
                port,
                ssl=ssl.create_default_context() if tls else None,
            ),
            30,
        )
    except (OSError, asyncio.TimeoutError) as err:
        raise VicunaError(f"{url}: cannot connect ({err or 'timed out'})") from None
    try:
        return await asyncio.wait_for(stream.result, timeout)
    except asyncio.TimeoutError:
        stream.transport.close()
        raise VicunaError(f"{url}: no complete answer within {timeout:.0f}s") from None


def run(wave: Coroutine[Any, Any, Wave]) -> Wave:
    """Run a wave on uvloop where it is installed (uvicorn's standard extra brings it): the client shares
    the cores with the server it measures, and uvloop's loop takes less CPU per streamed token than
    asyncio's own. uvicorn's extra takes a uvloop older than 0.18, which has no `run`: asyncio's loop then."""
    try:
        from uvloop import run as run_on_uvloop
    except ImportError:
        return asyncio.run(wave)
    return run_on_uvloop(wave)


async def run_wave(url: str, model: str, streams: int, new_tokens: int, api_key: str | None = None) -> Wave:
    """`streams` requests at once, each on its own connection."""
    bodies = [request_body(model, new_tokens) for _ in range(streams)]
    start = time.perf_counter()
    results = await asyncio.gather(*(stream_one(url, body, api_key=api_key) for body in bodies))
    return summarize_wave(streams, list(results), time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(settings: ModelSettings, port: int) -> list[str]:
    """`vicuna serve` with the same model flags, API only."""
    cmd = [
        sys.executable,
        "-m",
        "vicuna",
        "serve",
        "--port",
        str(port),
        "--no-webui",
        "--log-level",
        "warning",
    ]
    flags = {
        "--model-path": settings.model_path,
        "--device": settings.device,
        "--dtype": settings.dtype,
        "--max-gpu-memory": settings.max_gpu_memory,
        "--conv-template": settings.conv_template,
        "--conv-system-msg": settings.conv_system_msg,
    }
    cmd += [x for flag, value in flags.items() if value is not None for x in (flag, str(value))]
    cmd += ["--num-gpus", str(settings.num_gpus)] + (["--load-8bit"] if settings.load_8bit else [])
    return cmd


@contextlib.contextmanager
def started_server(settings: ModelSettings, timeout: float) -> Iterator[str]:
    """Start `vicuna serve` on a free port, wait until /health answers, yield its URL, stop it."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(serve_command(settings, port), stdout=log, stderr=subprocess.STDOUT)

        def log_tail() -> str:
            log.seek(0)
            text = log.read().decode(errors="replace")[-2000:].strip()
            return f"its output:\n{text}" if text else "it printed nothing yet"

        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise VicunaError(f"`vicuna serve` exited with code {proc.returncode}; {log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise VicunaError(
                        f"`vicuna serve` did not answer within {timeout:g}s (--startup-timeout); {log_tail()}"
                    )
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def model_names(url: str, api_key: str | None = None) -> list[str]:
    """The names the server at `url` takes for its model: its /v1/models, the name and then the aliases
    (`vicuna serve --model-name NAME,ALIAS`)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        answer = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as err:
        raise VicunaError(f"{url}/v1/models: cannot list the served model ({err})") from None
    if answer.status_code == 401:
        refused = "refused the API key" if api_key else "wants an API key"
        raise VicunaError(f"{url}/v1/models answered 401: the server {refused}; {KEY_HINT}")
    try:
        models = answer.json()["data"] if answer.status_code == 200 else None
        names = [m["id"] for m in models] if isinstance(models, list) else None
    except (KeyError, TypeError, ValueError):
        names = None
    if names is None or not all(isinstance(n, str) for n in names):
        raise VicunaError(
            f"{url}/v1/models answered {answer.status_code} without a list of models: is it the address of "
            "a `vicuna serve` (an OpenAI-compatible API)?"
        )
    if not names:
        raise VicunaError(f"{url}/v1/models lists no model")
    return names


def time_engine_direct(engine: Any, new_tokens: int) -> StreamResult:
    """The same request through `Engine.chat` in this process: what the API adds is the difference."""
    from vicuna.bench.latency import greedy
    from vicuna.conversation import Message
    from vicuna.engine.events import Finished

    events = engine.chat([Message(role="user", content=prompt())], greedy(new_tokens))
    done = [e for e in events if isinstance(e, Finished)][0]
    return StreamResult(done.ttft_s, done.total_s, done.completion_tokens, done.decode_tokens_per_s)


def check_same_model(url: str, served: list[str], local: str, settings: ModelSettings) -> str:
    """The name to ask the server for: the one of the model the engine-direct baseline loads, among the
    names it lists, its aliases included. Refuse a server that lists no such name: the API figures would
    compare two models."""
    if local in served:
        return local
    raise VicunaError(
        f"{url} serves {' and '.join(map(repr, served))}, but the baseline (the engine called directly here) "
        f"loads {local!r} (--model-path {settings.model_path or 'not given: the built-in model'}): pass the "
        "served model's --model-path (and its --dtype and --load-8bit), or leave out --url to have a server "
        f"of --model-path started here; a server of this model under another name is taken once it lists "
        f"this one too (`vicuna serve --model-name NAME,{local}`)"
    )


def check_request_fits(engine: Any, new_tokens: int) -> None:
    """Refuse a reply that the model's context window cannot hold beside the benchmark's request, before
    a server is started for it."""
    from vicuna.conversation import Message

    longest = f"Request {10**6}. {PROMPT}"  # numbered requests: a few digits more than the first
    check_reply_fits(engine, len(engine.encode_chat([Message(role="user", content=longest)])), new_tokens)


def bench_serve(
    settings: ModelSettings,
    *,
    url: str | None = None,
    api_key: str | None = None,
    streams: list[int] | None = None,
    new_tokens: int = 128,
    runs: int = 1,
    startup_timeout: float = 600,
    progress: bool = True,
) -> Report:
    from vicuna.bench.report import machine_info, progress_bar
    from vicuna.engine.loader import load_engine

    levels = sorted({1, *(streams or [1, 4, 16, 64])})
    if levels[0] < 1:
        raise VicunaError(f"--streams must be at least 1 each, not {levels[0]}")
    if runs < 1:
        raise VicunaError(f"--runs must be at least 1, not {runs}")
    if url is not None:  # asked before the model is loaded: a wrong URL or key fails at once
        url = url.rstrip("/").removesuffix("/v1")
        served = model_names(url, api_key)
    engine = load_engine(settings, progress=progress)
    check_request_fits(engine, new_tokens)
    direct: list[StreamResult] = []
    waves: dict[int, list[Wave]] = {n: [] for n in levels}
    with contextlib.ExitStack() as stack:
        if url is None:
            if progress:
                print("starting `vicuna serve` ...", file=sys.stderr, flush=True)
            url = stack.enter_context(started_server(settings, startup_timeout))
            served = model_names(url, api_key)
        name = check_same_model(url, served, engine.model_name, settings)

        def wave(n: int) -> Wave:
            return run(run_wave(url, name, n, new_tokens, api_key))

        bar = stack.enter_context(progress_bar(progress))
        task = bar.add_task("warm-up", total=runs * (2 * API_PAIRS + len(levels) - 1) + 2)
        time_engine_direct(engine, new_tokens)  # warm-up: first-call costs are not what we measure
        bar.advance(task)
        wave(1)
        bar.advance(task)
        for i in range(runs):
            for _ in range(API_PAIRS):
                bar.update(task, description=f"engine directly and 1 stream, run {i + 1}/{runs}")
                direct.append(time_engine_direct(engine, new_tokens))
                bar.advance(task)
                waves[1].append(wave(1))
                bar.advance(task)
            for n in levels[1:]:
                bar.update(task, description=f"{n} streams, run {i + 1}/{runs}")
                waves[n].append(wave(n))
                bar.advance(task)
    report = Report(
        "serve",
        settings={
            **model_info(engine, settings),
            "url": url,
            "streams": levels,
            "new_tokens": new_tokens,
            "runs": runs,
        },
        machine=machine_info(),
        samples={
            "engine_direct": [asdict(r) for r in direct],
            "waves": {str(n): [asdict(w) for w in ws] for n, ws in waves.items()},
        },
    )
    add_serve_rows(report, direct, waves)
    if not any(r.metric == "API decode" for r in report.rows):
        print(
            f"note: no API decode figure: the replies' text came in fewer than {MIN_CONTENT_READS} reads "
            "(the server sends a reply's text at most every 20 ms, `vicuna serve --stream-interval`); ask "
            "for more --new-tokens",
            file=sys.stderr,
        )
    return report


P = TypeVar("P")


def median_pair(pairs: Sequence[P], ratio: Callable[[P], float]) -> P:
    """The pair whose `ratio` is the median (the lower one of two middle pairs): one engine reply and the
    API reply right after it, so that what moved between minutes (on a noisy VM the engine alone moved
    between 50 and 77 tok/s) is not mixed into the ratio, as it is in a ratio of medians taken from
    different minutes."""
    ranked = sorted(pairs, key=ratio)
    return ranked[(len(ranked) - 1) // 2]


def add_serve_rows(report: Report, direct: list[StreamResult], waves: dict[int, list[Wave]]) -> None:
    """One stream against the engine called directly: every row from the same pair (waves[1][i] was sent
    right after direct[i]), the median pair by the decode ratio (`median_pair`), or by the tokens/s
    ratio where no API reply has a decode rate (the decode row is then left out); n streams against one
    stream: medians over the runs."""

    def med(items: list[Any], name: str) -> float:
        return median([getattr(x, name) for x in items])

    def over(value: float, baseline: float) -> float:
        return value / baseline if baseline else float("inf")

    one = waves[1]
    pairs = list(zip(one, direct, strict=True))
    rated = [(w, d) for w, d in pairs if w.decode_p50_tokens_per_s is not None and d.decode_tokens_per_s]
    group = "1 stream"
    if rated:
        api, engine = median_pair(
            rated, lambda p: over(p[0].decode_p50_tokens_per_s, p[1].decode_tokens_per_s)
        )
        report.add(group, "API decode", "tok/s", api.decode_p50_tokens_per_s, "engine directly",
                   engine.decode_tokens_per_s, target=API_TARGET)  # fmt: skip
    else:
        api, engine = median_pair(pairs, lambda p: over(p[0].tokens_per_s, p[1].tokens / p[1].total_s))
    report.add(
        group, "API tokens/s", "tok/s", api.tokens_per_s, "engine directly", engine.tokens / engine.total_s
    )
    report.add(group, "API TTFT", "ms", api.ttft_p50_s * 1e3, "engine directly", engine.ttft_s * 1e3)
    for n, ws in waves.items():
        if n == 1:
            continue
        group = f"{n} streams"
        report.add(group, "aggregate", "tok/s", med(ws, "tokens_per_s"), "1 stream", med(one, "tokens_per_s"),
                   target=STREAMS_TARGET.get(n))  # fmt: skip
        report.add(
            group, "TTFT p50", "ms", med(ws, "ttft_p50_s") * 1e3, "1 stream", med(one, "ttft_p50_s") * 1e3
        )
        report.add(
            group, "TTFT p99", "ms", med(ws, "ttft_p99_s") * 1e3, "1 stream", med(one, "ttft_p99_s") * 1e3
        )


__all__ = [
    "StreamResult",
    "Wave",
    "bench_serve",
    "check_same_model",
    "median_pair",
    "sse_payloads",
    "summarize_wave",
]
