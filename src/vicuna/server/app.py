"""The OpenAI-compatible HTTP API over one batched engine, built by `create_app` (no global state).

Routes: /v1/models[/{name}], /v1/chat/completions, /v1/completions, /v1/embeddings, /health, /metrics.
Every error has OpenAI's body `{"error": {"message", "type", "param", "code"}}`; no traceback reaches a
client. Requests run on a `Batcher` (continuous batching); a client that disconnects cancels its
generation at the next token. Each request logs one line with its time to first token, its token
counts and its decode speed.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import collections
import contextlib
import functools
import hmac
import json
import logging
import re
import struct
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse as _JSONResponse
from fastapi.responses import Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from vicuna import protocol as p
from vicuna.config import SamplingParams
from vicuna.engine.detok import IncrementalDecoder
from vicuna.engine.events import Finished, TextChunk, TokenLogprob
from vicuna.errors import ContextTooLongError, ServerBusyError, ShuttingDownError, VicunaError
from vicuna.server import STREAM_INTERVAL_MS
from vicuna.textfile import json_problem

log = logging.getLogger("vicuna.server")

RETRY_AFTER_S = 1
API_ROUTES = "POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings and GET /v1/models[/NAME]"
HTTP_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# The API's paths as a client whose base URL lacks /v1 calls them (base_url="http://host:8000")
WITHOUT_V1 = ("/chat/completions", "/completions", "/embeddings", "/models")
# Ollama's own API, which front-ends with an "Ollama" connection call (Open WebUI, Enchanted, ollama-python):
# the list of models first, then a chat
OLLAMA_ROUTES = (
    "/api/tags", "/api/version", "/api/ps", "/api/show", "/api/chat", "/api/generate", "/api/embed", "/api/embeddings",
)  # fmt: skip
# LitGPT's `litgpt serve` (LitServe): POST /predict with {"prompt": ...}
LITGPT_ROUTES = ("/predict",)


class JSONResponse(_JSONResponse):
    """JSON in UTF-8, saying so: without the charset, clients such as Windows PowerShell 5.1's
    Invoke-RestMethod read the body as ISO-8859-1 and show Chinese replies as mojibake."""

    media_type = "application/json; charset=utf-8"


OUT_OF_MEMORY = (
    "out of memory while generating: this request did not fit beside the replies running with it; retry "
    "shortly, or start the server with a smaller --max-batch-size or --kv-cache-tokens"
)


class APIError(Exception):
    """An HTTP error with OpenAI's body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return p.error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def failure(err: BaseException) -> APIError:
    """What a client is told (and the metrics count) when generating failed: the server stopping or out of
    memory (503, to retry), the request's own fault (400, as the app's handler answers it), or a bug (500)."""
    from vicuna.engine.memory import out_of_memory

    if isinstance(err, APIError):
        return err
    if isinstance(err, ShuttingDownError):  # not the request's fault: to send again
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        return APIError(503, str(err), "server_error", code="shutting_down", headers=retry)
    if isinstance(err, VicunaError):  # MessagesError names its param
        return APIError(400, str(err), param=getattr(err, "param", None))
    if out_of_memory(err):  # CUDA's error, or mps's RuntimeError
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        return APIError(503, OUT_OF_MEMORY, "server_error", code="out_of_memory", headers=retry)
    return APIError(500, "internal server error; the server log has the details", "server_error")


class Metrics:
    """Prometheus metrics in the app's own registry, so several apps can live in one process."""

    def __init__(self, batcher: Any) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "vicuna_requests",
            "Requests: the API's, and the web UI's chats (webui)",
            ["endpoint", "status"],
            registry=r,
        )
        self.finished = Counter("vicuna_replies_finished", "Replies by finish reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("vicuna_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter(
            "vicuna_completion_tokens", "Completion tokens generated", registry=r
        )
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram(
            "vicuna_time_to_first_token_seconds", "Request start to first token", buckets=buckets, registry=r
        )
        itl_buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
        self.itl = Histogram(
            "vicuna_inter_token_latency_seconds",
            "Time between the tokens of a reply as sent (tokens sent together, see --stream-interval: 0 apart)",
            buckets=itl_buckets,
            registry=r,
        )
        Gauge("vicuna_queue_depth", "Requests waiting for a batch row", registry=r).set_function(
            lambda: batcher.waiting
        )
        Gauge("vicuna_running_batch_size", "Replies in the running batch", registry=r).set_function(
            lambda: batcher.running
        )
        Gauge("vicuna_kv_cache_tokens", "KV cache in use, in tokens", registry=r).set_function(
            lambda: batcher.stats.kv_tokens
        )
        Gauge("vicuna_kv_cache_capacity_tokens", "KV cache bound, in tokens", registry=r).set_function(
            lambda: batcher.kv_cache_tokens
        )

    def record(
        self,
        endpoint: str,
        status: int,
        reasons: Sequence[str],
        prompt_tokens: int,
        completion_tokens: int,
        ttft: float | None,
    ) -> None:
        """One request's counts: `reasons`, how each of its choices finished; `ttft`, None before any token."""
        self.requests.labels(endpoint, str(status)).inc()
        for reason in reasons:
            self.finished.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)


@dataclass
class _Choice:
    """What one generated choice has produced so far."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Of `logprobs`, those of the tokens whose text has come: a chat lists no more (OpenAI's are those "of
    # each output token returned in the content"), not those of a stop string, whose text never comes
    shown: int = 0
    finished: Finished | None = None
    started: bool = False  # whether text other than white space has come
    tokens: int = 0  # sampled so far: what a choice cut short by its client's leaving counts


class _Run:
    """One HTTP request's choices on the batcher: their events arrive on the event loop's queue."""

    def __init__(
        self,
        server: _Server,
        endpoint: str,
        prompts: Sequence[list[int]],
        params: Sequence[SamplingParams],
        replies_param: str = "n",
    ):
        """`replies_param`: what a request for more replies than the server takes is to lower (`n`, or
        `prompt` for several prompts)."""
        self.server, self.endpoint, self.replies_param = server, endpoint, replies_param
        self.loop = asyncio.get_running_loop()
        # The batcher's thread puts events in `inbox` and wakes the event loop once for what it hands over
        # at once; `events_until_done` takes them all (`more_ready`), so that they go out in one write.
        # Both sides touch `inbox` and `wake_pending` only under the batcher's `handing_over` lock.
        self.inbox: collections.deque[tuple[int, Any]] = collections.deque()
        self.taken: collections.deque[tuple[int, Any]] = collections.deque()
        self.wake_pending = False
        self.woken = asyncio.Event()
        self.cancel = threading.Event()
        self.choices = [_Choice() for _ in params]
        self.prompts, self.params = prompts, params
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: dict[int, float] = {}
        self.id = ""

    def submit(self) -> None:
        batcher = self.server.batcher
        self.server.check_queue(len(self.params), self.replies_param)
        try:
            for index, (ids, params) in enumerate(zip(self.prompts, self.params, strict=True)):
                batcher.add(ids, params, self._sink(index), cancel=self.cancel)
        except BaseException:  # the choices already added would run with nobody to read them
            self.cancel.set()
            raise

    def _sink(self, index: int):
        def deliver(event: Any) -> None:  # on the batcher's thread, under its `handing_over`
            self.inbox.append((index, event))
            wake, self.wake_pending = not self.wake_pending, True
            if wake:
                try:
                    self.loop.call_soon_threadsafe(self.woken.set)
                except RuntimeError:  # the event loop is gone: nobody is listening any more
                    self.cancel.set()

        return deliver

    @property
    def more_ready(self) -> bool:
        """Whether events have been taken from the inbox that `events_until_done` has not yielded yet."""
        return bool(self.taken)

    async def _next_event(self) -> tuple[int, Any]:
        while not self.taken:
            with self.server.batcher.handing_over:  # a hand-over in progress ends first
                self.taken, self.inbox = self.inbox, self.taken
                self.wake_pending = False
            if not self.taken:
                await self.woken.wait()
                self.woken.clear()
        return self.taken.popleft()

    async def events_until_done(self) -> AsyncIterator[tuple[int, TextChunk | Finished]]:
        """(choice index, event) until every choice has finished; the batcher's errors are raised."""
        pending = len(self.choices)
        while pending:
            index, event = await self._next_event()
            if isinstance(event, BaseException):
                self.cancel.set()
                raise event
            now = time.perf_counter()
            choice = self.choices[index]
            if isinstance(event, TextChunk):
                if self.endpoint == "chat" and not choice.started:
                    # A chat reply starts at its first visible character: templates that end on "ASSISTANT:"
                    # get " The..." from byte-level tokenizers (completions keep the text as generated).
                    event = replace(event, text=event.text.lstrip())
                    choice.started = bool(event.text)
                choice.tokens += len(event.token_ids)
                if event.token_ids:
                    self.first_token_at = self.first_token_at or now
                    last = self.last_token_at.get(index)
                    if last is not None:
                        self.server.metrics.itl.observe((now - last) / len(event.token_ids))
                    self.last_token_at[index] = now
                choice.text.append(event.text)
                choice.logprobs.extend(event.logprobs or ())
                if event.text:
                    choice.shown = len(choice.logprobs)
            else:
                choice.finished = event
                pending -= 1
                if event.reason == "cancelled" and self.server.batcher.closed:  # not the client's doing
                    raise failure(ShuttingDownError())
            yield index, event

    @property
    def prompt_tokens(self) -> int:
        # n choices of one prompt share it: OpenAI counts a prompt once
        seen = {id(ids): len(ids) for ids in self.prompts}
        return sum(seen.values())

    @property
    def completion_tokens(self) -> int:
        return sum(c.finished.completion_tokens if c.finished else c.tokens for c in self.choices)

    def usage(self) -> p.Usage:
        return p.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )

    def record(self, status: int) -> None:
        """Metrics and the one log line for this request."""
        end = time.perf_counter()
        ttft = None if self.first_token_at is None else self.first_token_at - self.start
        # a choice not finished by now was cancelled (its client left)
        reasons = [c.finished.reason if c.finished else "cancelled" for c in self.choices]
        self.server.metrics.record(
            self.endpoint, status, reasons, self.prompt_tokens, self.completion_tokens, ttft
        )
        log_request(
            f"{self.id} {self.endpoint}",
            status,
            self.prompt_tokens,
            self.completion_tokens,
            reasons,
            self.start,
            self.first_token_at,
            end,
        )


def log_request(
    what: str,
    status: int,
    prompt_tokens: int,
    completion_tokens: int,
    reasons: Sequence[str],
    start: float,
    first_token_at: float | None,
    end: float,
) -> None:
    """The one log line of a request (`what`: its id and endpoint), an API request's or a web UI chat's, without
    its text: prompts stay out of the log. `reasons`: how each of its choices finished."""
    ttft = None if first_token_at is None else first_token_at - start
    decode = end - (first_token_at or end)
    rate = (completion_tokens - len(reasons)) / decode if decode > 0 else 0.0
    log.info(
        "%s %d prompt=%d completion=%d ttft=%s decode=%.1f tok/s total=%.2fs finish=%s",
        what,
        status,
        prompt_tokens,
        completion_tokens,
        "-" if ttft is None else f"{ttft:.3f}s",
        max(rate, 0.0),
        end - start,
        ",".join(reasons),
    )


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set `cancel` when the client goes away (the body has been read, so only a disconnect remains)."""
    while not cancel.is_set():
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


@dataclass
class _Server:
    batcher: Any
    model_name: str
    aliases: tuple[str, ...]  # other names clients may use for the model (--model-name NAME,ALIAS,...)
    api_keys: frozenset[str]
    max_queue: int
    metrics: Metrics

    @property
    def engine(self) -> Any:
        return self.batcher.engine

    def check_auth(self, request: Request) -> None:
        if not self.api_keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(
                401, "no API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
        # compare_digest against every key, as the web UI does: the time taken does not tell how much matched.
        # The header's bytes (read as Latin-1 by the server) against each key's UTF-8: any text is a key.
        # Stripped as bytes: str.strip() also takes 0xA0 and 0x85, the last byte of "à" or "Å" in UTF-8.
        sent = key.encode("latin-1").strip()
        if not any(hmac.compare_digest(sent, k.encode()) for k in self.api_keys):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    async def read_json(self, request: Request) -> Any:
        """The request's JSON body, of at most `BODY_BYTES_PER_TOKEN` bytes per token of the context window."""
        window = self.engine.context_window
        return await _read_json(request, BODY_BYTES_PER_TOKEN * window, window)

    def check_queue(self, choices: int, param: str | None = None) -> None:
        """429 when `choices` more replies would leave more than `max_queue` requests waiting for a row;
        400 (naming `param`) when they are more than a row each and the whole queue: retrying never helps."""
        batcher = self.batcher
        most = batcher.max_batch_size + self.max_queue
        if choices > most:
            raise APIError(
                400,
                f"this request asks for {choices} replies (its prompts times n), more than this server takes at "
                f"once: {most} (--max-batch-size {batcher.max_batch_size} + --max-queue {self.max_queue}); "
                "send them in several requests",
                param=param,
                code="too_many_replies",
            )
        # the requests that would wait for a row, these choices last: those the free rows do not take at once
        free = max(0, batcher.max_batch_size - batcher.running)
        if batcher.waiting + choices - free > self.max_queue:
            raise APIError(
                429,
                f"the server is busy: {batcher.waiting} requests are waiting (--max-queue {self.max_queue}); retry shortly",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    def check_model(self, model: str | None) -> None:
        """`model` names the served model or one of its aliases; None (not named) is the served model."""
        if model is not None and model != self.model_name and model not in self.aliases:
            also = f" (also as {', '.join(map(repr, self.aliases))})" if self.aliases else ""
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}{also}",
                param="model",
                code="model_not_found",
            )

    def max_new_tokens(
        self,
        requested: int | None,
        prompt_len: int,
        param: str = "max_tokens",
        prompt_param: str = "messages",
        which: str = "",
    ) -> int:
        """The reply budget: as asked, or all the room the context window leaves; 400 when it does not fit,
        naming `prompt_param` where the prompt alone leaves no room (a smaller `param` would not help). A
        prompt only scored (`requested` 0) may fill the window. `which`: the prompt among several
        (`prompt[3]`), said first, and named as the prompt at fault."""
        window, where = self.engine.context_window, f"{which}: " if which else ""
        if prompt_len > window or prompt_len == window and requested != 0:
            raise APIError(
                400,
                f"{where}the prompt has {prompt_len} tokens and leaves no room for a reply in the model's "
                f"context window of {window} tokens: shorten it",
                param=which or prompt_param,
                code="context_length_exceeded",
            )
        budget = requested if requested is not None else window - prompt_len
        if prompt_len + budget > window:
            err = ContextTooLongError(prompt_len, budget, window)
            raise APIError(400, f"{where}{err}", param=param, code="context_length_exceeded")
        return budget


async def _read_json(request: Request, limit: int, window: int) -> Any:
    """The request's JSON body; 413 for one over `limit` bytes, before more of it is read into memory."""
    too_large = APIError(
        413,
        f"the request body is larger than this server takes: {limit} bytes ({BODY_BYTES_PER_TOKEN} for each "
        f"token of the model's {window}-token context window)",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    try:
        data = json.loads(body)
    except UnicodeDecodeError as err:  # JSON is UTF-8; GBK is what a Chinese Windows sends by default
        raise APIError(
            400,
            f"the request body is not UTF-8 (byte {err.start} is 0x{body[err.start]:02x}): send the JSON "
            "encoded as UTF-8",
        ) from None
    except json.JSONDecodeError as err:
        raise APIError(400, f"the request body is not valid JSON ({json_problem(err)})") from None
    except RecursionError:  # the decoder recurses once per array or object opened
        raise APIError(
            400,
            "the request body nests arrays or objects too deeply (no request field needs more than a few levels)",
        ) from None
    except ValueError:  # left: an integer longer than Python reads (was a 500 that dropped the connection)
        raise APIError(
            400,
            f"the request body holds an integer of more than {sys.get_int_max_str_digits()} digits, "
            "a number too long to read (no request field takes one)",
        ) from None
    if SURROGATE_ESCAPE.search(body) and (where := _unpaired_surrogate(data)) is not None:
        raise APIError(
            400,
            f"{where or 'the body'}: holds an unpaired UTF-16 surrogate (a \\ud800-\\udfff escape without its "
            "other half), which is no text: send whole characters",
            param=where or None,
        )
    return data


# JSON's escape of a UTF-16 surrogate: a character outside the BMP is sent as a pair of them, and one alone
# decodes to a string no tokenizer or UTF-8 answer can take (it was a 500).
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _unpaired_surrogate(data: Any) -> str | None:
    """Where in `data` (`messages[0].content`; "" for `data` itself) a string, or an object's key, holds an
    unpaired surrogate; None if nowhere."""
    todo: list[tuple[str, Any]] = [("", data)]
    while todo:  # no recursion: the body may nest as deep as the decoder allowed
        path, item = todo.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                return path
        elif isinstance(item, dict):
            for key, value in item.items():
                inner = f"{path}.{key}" if path else key
                todo += [(inner, value), (path, key)]  # the key is looked at first
        elif isinstance(item, list):
            todo += [(f"{path}[{i}]", value) for i, value in enumerate(item)]
    return None


# A request body may hold this many bytes for each token of the model's context window: many times what a
# prompt that fits takes (as text, as JSON-escaped non-ASCII text or as token ids), room for lists of
# prompts; a larger one is refused before it is read. Unbounded, a 10 MB body grew the server by 300 MB
# while it was tokenized (5.5 s of CPU on 2 cores) only to be refused as too long for the window.
BODY_BYTES_PER_TOKEN = 1024


def _filled(render: Callable[[str], str]) -> Callable[[str], str]:
    """A function equal to `render` for any text, from one call of it: the SSE line rendered once with a
    marker where the text goes, then each text JSON-quoted into its place. A streamed token's chunk then
    costs a string join, not three pydantic models built and dumped: under load that was the largest
    part of the event loop's time per token, which on a small CPU is taken from decoding."""
    marker = "\x00vicuna-text\x00"
    head, tail = render(marker).split(json.dumps(marker))
    return lambda text: head + json.dumps(text, ensure_ascii=False) + tail


def _sse(data: Any) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


def _chat_logprobs(items: Sequence[TokenLogprob]) -> p.ChoiceLogprobs:
    return p.ChoiceLogprobs(
        content=[
            p.TokenLogprobOut(
                token=t.token,
                logprob=t.logprob,
                bytes=list(t.raw),
                top_logprobs=[p.TopLogprob(token=s, logprob=lp, bytes=list(b)) for _, s, lp, b in t.top],
            )
            for t in items
        ]
    )


class _TextOffsets:
    """Where each of a choice's tokens begins in its text: the whole characters of the tokens' bytes before
    it. A stream counts them so too, not as the text sent so far, which holds back what may begin a stop
    string: with `stop: ["\\n\\n"]`, the tokens after a "\\n" were each given the offset of that "\\n"."""

    def __init__(self, start: int) -> None:
        self.at = start
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    def take(self, raw: bytes) -> int:
        """The offset of the token of these bytes; the next one begins after them."""
        at, self.at = self.at, self.at + len(self._utf8.decode(raw))
        return at


def _completion_logprobs(items: Sequence[TokenLogprob], offset: int | _TextOffsets) -> p.CompletionLogprobs:
    """`offset`: the characters of the choice's text before these tokens' (which start a character), or
    the choice's `_TextOffsets` so far. A token's `top_logprobs` hold the most likely tokens and the token
    itself, as OpenAI's do (so up to `logprobs` + 1 of them): scripts read a token's logprob there, and
    with `logprobs` 0 it is the one."""
    out = p.CompletionLogprobs()
    offsets = offset if isinstance(offset, _TextOffsets) else _TextOffsets(offset)
    for t in items:
        out.tokens.append(t.token)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append(
            None if t.logprob is None else {t.token: t.logprob} | {s: lp for _, s, lp, _ in t.top}
        )
        out.text_offset.append(offsets.take(t.raw))
    return out


def _prompt_logprobs(
    items: Sequence[TokenLogprob], tokenizer: Any, starts: list[int] | None
) -> p.CompletionLogprobs:
    """A scored prompt's logprobs. `text_offset` is where each token begins in the echoed text: `starts`,
    the tokenizer's offsets into a text prompt, where there are as many; else where it begins in the
    prompt's tokens decoded (a token-id prompt's echo), in which a special token (BOS) takes no room, nor
    does the space SentencePiece gives a first word. Counted from the tokens' own bytes, as for a reply,
    offsets ran ahead of the echoed text by both, and behind it after a special token typed in a text."""
    out = _completion_logprobs(items, 0)
    if starts is not None and len(starts) == len(items):
        out.text_offset = list(starts)
        return out
    decoder, length = IncrementalDecoder(tokenizer), 0
    for i, t in enumerate(items):
        out.text_offset[i] = length
        length += len(decoder.add(t.token_id))
    return out


def _joined(prompt: p.CompletionLogprobs | None, reply: p.CompletionLogprobs) -> p.CompletionLogprobs:
    """An echoed prompt's logprobs followed by its reply's."""
    if prompt is None:
        return reply
    return p.CompletionLogprobs(
        **{name: getattr(prompt, name) + getattr(reply, name) for name in p.CompletionLogprobs.model_fields}
    )


def _status(err: BaseException) -> int:
    """The status the app's exception handlers answer `err` with."""
    if isinstance(err, p.InvalidRequest):
        return 400
    if isinstance(err, StarletteHTTPException):
        return err.status_code
    if isinstance(err, ClientDisconnect):  # gone while sending its body: no server error
        return 499
    return failure(err).status


def _finish_reason(event: Finished) -> str:
    return "length" if event.reason == "length" else "stop"


def check_settings(max_queue: int, max_batch_size: int, stream_interval_ms: float) -> None:
    """The server's settings, named by the flags that set them (those of its `Batcher` included)."""
    from vicuna.engine import batching

    if max_queue < 0:
        raise VicunaError(f"--max-queue must be >= 0, not {max_queue}")
    batching.check_settings(max_batch_size, stream_interval_ms / 1e3)


def create_app(
    engine: Any,
    *,
    model_name: str | None = None,
    aliases: Sequence[str] = (),
    api_keys: Sequence[str] = (),
    max_queue: int = 64,
    max_batch_size: int = 16,
    kv_cache_tokens: int | None = None,
    stream_interval_ms: float = STREAM_INTERVAL_MS,
    webui: bool = False,
    allowed_origins: Sequence[str] = (),
) -> FastAPI:
    """The API app for one engine. The app owns a `Batcher` over it (`app.state.batcher`), closed
    when the app shuts down. With `webui`, the Gradio page of `vicuna.webui` is mounted at `/`,
    chatting through the same batcher. A streamed reply's text goes out at most every
    `stream_interval_ms` after its first token (see `STREAM_INTERVAL_MS`). Web pages from `allowed_origins`
    ("*": any) may call the API from a browser (CORS); from no other origin than the server's own.
    Requests may name the model by `model_name` or by any of `aliases`; replies name it `model_name`."""
    from vicuna.engine.batching import Batcher

    check_settings(max_queue, max_batch_size, stream_interval_ms)
    batcher = Batcher(
        engine,
        max_batch_size=max_batch_size,
        kv_cache_tokens=kv_cache_tokens,
        stream_interval_s=stream_interval_ms / 1e3,
    )
    server = _Server(
        batcher=batcher,
        model_name=model_name or engine.model_name,
        aliases=tuple(aliases),
        api_keys=frozenset(k.strip() for k in api_keys if k.strip()),
        max_queue=max_queue,
        metrics=Metrics(batcher),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(
        title="vicuna",
        summary="OpenAI-compatible API",
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )
    app.state.batcher, app.state.model_name, app.state.metrics = batcher, server.model_name, server.metrics
    # Always, with no origin at all by default: the web UI's Gradio routes then follow it too. Gradio's own
    # CORS, used where the app has none, answered every origin, credentials allowed, on a server reached by
    # another name than localhost (a LAN address, a domain): any web site its users visited could drive the
    # web UI's chat from their browsers and read the replies. Any header: the OpenAI SDKs send their own.
    # Private network access: Chrome asks before a page of a public site (a hosted NextChat, Chatbox web,
    # an Open WebUI direct connection) calls a server on this machine or the LAN, and the preflight was
    # refused ("Disallowed CORS private-network") though its origin was allowed; naming the origin is that
    # opt-in. Not with "*": any site a user visits would then reach a server on their machine from Chrome.
    from starlette.middleware.cors import CORSMiddleware

    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(allowed_origins),
        allow_methods=["GET", "POST"],
        allow_headers=["*"],
        allow_private_network="*" not in allowed_origins,
    )

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(p.InvalidRequest)
    async def _invalid(_: Request, err: p.InvalidRequest) -> JSONResponse:
        return APIError(400, err.message, param=err.param, code=err.code).response()

    @app.exception_handler(VicunaError)
    async def _user_error(_: Request, err: VicunaError) -> JSONResponse:
        return failure(err).response()  # 400 (MessagesError names the param), or 503 while shutting down

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        headers = getattr(err, "headers", None)
        message = str(err.detail)
        # Starlette's bare "Not Found" / "Method Not Allowed" left an SDK user (`client.responses.create`,
        # a base_url without /v1) guessing whether the model, the server or the URL was wrong
        called = f"{request.method} {request.url.path}"
        if err.status_code == 404 and message == "Not Found":
            message = f"{called}: no such route; this API serves {API_ROUTES}"
            if "//" in request.url.path:  # Chatbox, SillyTavern: f"{base_url}/chat/completions"
                message += "; the path holds '//': take the '/' off the end of the base URL"
            elif "/v1/" not in request.url.path and request.url.path.endswith(WITHOUT_V1):
                message += "; the path lacks /v1: add it to the end of the base URL"
            elif request.url.path.endswith(OLLAMA_ROUTES):
                message += (
                    "; it is Ollama's own API, which this server does not speak: connect the client as to an "
                    "OpenAI-compatible API, its base URL ending in /v1"
                )
            elif request.url.path.endswith(LITGPT_ROUTES):
                message += (
                    "; it is LitGPT's own API, which this server does not speak: send its prompt as "
                    '{"prompt": ...} to POST /v1/completions, or as messages to POST /v1/chat/completions'
                )
        elif err.status_code == 405 and message == "Method Not Allowed" and headers and "Allow" in headers:
            message = f"{called}: method not allowed; this path takes {headers['Allow']}"
        return APIError(err.status_code, message, kind, headers=headers).response()

    @app.exception_handler(ClientDisconnect)  # gone while sending its body: nobody to answer, no bug to log
    async def _gone(_: Request, err: ClientDisconnect) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return failure(err).response()

    vocab_size = engine.model.config.get_text_config().vocab_size

    async def _encode_all(items: Sequence[str | list[int]], param: str) -> list[list[int]]:
        """Token ids for texts (token lists as they are), computed off the event loop: a long text (a 10 MB
        body took 5.5 s on 2 cores) would otherwise stall every stream and /health meanwhile. A client's
        token id outside the vocabulary is a 400 naming `param` (`param[i]` of several, as other errors of
        one among them do): it failed inside the model as a 500 (on a GPU, an index out of range is a
        device-side assert); so is an empty text."""
        where = lambda i: f"{param}[{i}]" if len(items) > 1 else param  # noqa: E731
        for i, item in enumerate(items):
            bad = next((t for t in item if not 0 <= t < vocab_size), None) if isinstance(item, list) else None
            if bad is not None:
                raise APIError(
                    400,
                    f"{where(i)}: token id {bad} is not in the model's vocabulary (0-{vocab_size - 1})",
                    param=where(i),
                )
        token_lists = await asyncio.to_thread(
            lambda: [engine.encode(x) if isinstance(x, str) else x for x in items]
        )
        empty = next((i for i, ids in enumerate(token_lists) if not ids), None)
        if empty is not None:  # "" with a tokenizer that adds no BOS
            raise APIError(400, f"{where(empty)}: empty; at least one token is needed", param=where(empty))
        return token_lists

    def check_bias(req: p.ChatCompletionRequest | p.CompletionRequest) -> None:
        """A logit_bias for a token id outside the vocabulary is a 400, as such an id in a prompt is."""
        bad = next((i for i in req.bias_ids() if i >= vocab_size), None)
        if bad is not None:
            raise APIError(
                400,
                f"logit_bias: token id {bad} is not in the model's vocabulary (0-{vocab_size - 1})",
                param="logit_bias",
            )

    def api(path: str, endpoint: str):
        """A POST route of the API, its requests counted in /metrics as `endpoint`: one refused before it
        ran (400, 401, 404, 413, 429) or failing before it counted itself, with the status it was answered
        with. One that ran counts itself when it ends (`_Run.record`, embeddings' own count) and says so in
        `request.state.counted`. Only requests that ran were counted: /metrics showed no 429 however busy."""

        def route(handler: Callable[[Request], Any]) -> Any:
            @functools.wraps(handler)
            async def counted(request: Request) -> Any:
                try:
                    return await handler(request)
                except Exception as err:
                    if not getattr(request.state, "counted", False):
                        server.metrics.requests.labels(endpoint, str(_status(err))).inc()
                    raise

            return app.post(path, response_model=None)(counted)

        return route

    @app.api_route("/health", methods=["GET", "HEAD"])  # uptime monitors often ask with HEAD
    async def health() -> JSONResponse:
        # 503 once the server is stopping: a load balancer sends new requests elsewhere meanwhile
        body = {
            "status": "shutting_down" if batcher.closed else "ok",
            "model": server.model_name,
            "running": batcher.running,
            "waiting": batcher.waiting,
        }
        return JSONResponse(body, status_code=503 if batcher.closed else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str) -> p.ModelCard:
        return p.ModelCard(id=name, context_window=engine.context_window)

    @app.get(
        "/v1/models"
    )  # each alias too, as vLLM lists them: a client choosing from the list finds its name
    async def models(request: Request) -> dict[str, Any]:
        server.check_auth(request)
        return p.ModelList(data=[model_card(n) for n in (server.model_name, *server.aliases)]).model_dump()

    @app.get("/v1/models/{model:path}")  # a name may hold a "/" (lmsys/vicuna-7b-v1.5)
    async def model(request: Request, model: str) -> dict[str, Any]:
        server.check_auth(request)
        server.check_model(model)
        return model_card(model).model_dump()

    @api("/v1/chat/completions", "chat")
    async def chat_completions(request: Request) -> Response:
        server.check_auth(request)
        req: p.ChatCompletionRequest = p.parse_request(
            p.ChatCompletionRequest, await server.read_json(request)
        )
        server.check_model(req.model)
        check_bias(req)
        prompt = await asyncio.to_thread(engine.encode_chat, req.messages)  # see _encode_all
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        budget = server.max_new_tokens(req.requested_max_tokens(), len(prompt), param)
        n = req.n or 1
        params = [
            engine.chat_params(
                req.sampling_params(max_new_tokens=budget, choice=i, logprobs=req.logprobs_k())
            )
            for i in range(n)
        ]
        run = _Run(server, "chat", [prompt] * n, params)
        run.id = f"chatcmpl-{uuid.uuid4().hex}"
        return await _respond(
            request, run, req.stream, lambda: _chat_stream(run, req), lambda: _chat_result(run, req)
        )

    async def _chat_result(run: _Run, req: p.ChatCompletionRequest) -> dict[str, Any]:
        async for _ in run.events_until_done():
            pass
        choices = [
            p.ChatChoice(
                index=i,
                message=p.ChatMessage(content="".join(c.text)),
                logprobs=_chat_logprobs(c.logprobs[: c.shown]) if req.logprobs else None,
                finish_reason=_finish_reason(c.finished),
            )
            for i, c in enumerate(run.choices)
        ]
        return p.ChatCompletion(
            id=run.id, model=server.model_name, choices=choices, usage=run.usage()
        ).model_dump()

    async def _chat_stream(run: _Run, req: p.ChatCompletionRequest) -> AsyncIterator[str]:
        created = p.now()
        with_usage = req.include_usage

        def chunk(choices: list[p.ChatChunkChoice], usage: p.Usage | None = None) -> str:
            body = p.ChatCompletionChunk(
                id=run.id, created=created, model=server.model_name, choices=choices, usage=usage
            ).model_dump()
            for out, c in zip(body["choices"], choices, strict=True):  # a delta carries only what it has
                out["delta"] = c.delta.model_dump(exclude_none=True)
            if not with_usage:
                del body["usage"]
            return _sse(body)

        def choice(i: int, delta: p.Delta, logprobs=None, finish=None) -> p.ChatChunkChoice:
            return p.ChatChunkChoice(index=i, delta=delta, logprobs=logprobs, finish_reason=finish)

        for i in range(len(run.choices)):
            yield chunk([choice(i, p.Delta(role="assistant", content=""))])
        # logprobs of tokens whose text is still held back: those left at the end, of a stop string's
        # tokens (see `_Choice.shown`), are not listed
        held: dict[int, list[TokenLogprob]] = {}
        texts = [
            _filled(lambda text, i=i: chunk([choice(i, p.Delta(content=text))]))
            for i in range(len(run.choices))
        ]
        async for i, event in run.events_until_done():
            if isinstance(event, TextChunk):
                held.setdefault(i, []).extend(event.logprobs or ())
                if event.text and req.logprobs:
                    yield chunk([choice(i, p.Delta(content=event.text), _chat_logprobs(held.pop(i)))])
                elif event.text:
                    yield texts[i](event.text)
            elif event.reason != "cancelled":
                yield chunk([choice(i, p.Delta(), None, _finish_reason(event))])
        if with_usage:
            yield chunk([], run.usage())
        yield _sse("[DONE]")

    @api("/v1/completions", "completions")
    async def completions(request: Request) -> Response:
        server.check_auth(request)
        req: p.CompletionRequest = p.parse_request(p.CompletionRequest, await server.read_json(request))
        server.check_model(req.model)
        check_bias(req)
        items = req.prompts()
        prompts = await _encode_all(items, "prompt")
        texts = [
            item if isinstance(item, str) else engine.tokenizer.decode(ids, skip_special_tokens=True)
            for item, ids in zip(items, prompts, strict=True)
        ]
        n = req.n or 1
        window = engine.context_window  # without max_tokens OpenAI's 16, or the room the window leaves
        budgets = [  # of a list of prompts (an evaluation harness sends many), the one too long is named
            server.max_new_tokens(
                max(1, min(16, window - len(ids))) if req.max_tokens is None else req.max_tokens,
                len(ids),
                "max_tokens",
                "prompt",
                f"prompt[{i}]" if len(prompts) > 1 else "",
            )
            for i, ids in enumerate(prompts)
        ]
        params = [
            engine.stop_params(
                req.sampling_params(max_new_tokens=budget, choice=j, logprobs=req.logprobs_k())
            )
            for budget in budgets
            for j in range(n)
        ]
        each = [ids for ids in prompts for _ in range(n)]
        run = _Run(server, "completions", each, params, "prompt" if len(prompts) > 1 else "n")
        run.id = f"cmpl-{uuid.uuid4().hex}"
        echoes = [texts[i // n] if req.echo else "" for i in range(len(params))]
        scored: list[p.CompletionLogprobs | None] = [None] * len(params)
        if req.echo and req.logprobs is not None:  # the prompt's own logprobs, as evaluation harnesses read
            server.check_queue(len(params), run.replies_param)
            lists = await _scored(request, prompts, req.logprobs)
            if lists is None:  # the client went away: counted and logged, as one gone while generating is
                request.state.counted = True
                run.record(499)
                return Response(status_code=499)
            per_prompt = await asyncio.to_thread(
                lambda: [
                    _prompt_logprobs(
                        x, engine.tokenizer, engine.text_starts(item) if isinstance(item, str) else None
                    )
                    for x, item in zip(lists, items, strict=True)
                ]
            )
            scored = [per_prompt[i // n] for i in range(len(params))]
        return await _respond(
            request,
            run,
            req.stream,
            lambda: _completion_stream(run, req, echoes, scored),
            lambda: _completion_result(run, req, echoes, scored),
        )

    async def _scored(request: Request, prompts: list[list[int]], top: int) -> list[Any] | None:
        """`Engine.score` of each prompt, on the batcher's thread between its steps; None once the client
        has gone away."""
        cancel = threading.Event()
        watcher = asyncio.create_task(_watch_disconnect(request, cancel))
        try:
            return await asyncio.wrap_future(batcher.score(prompts, top, cancel))
        finally:
            cancel.set()
            watcher.cancel()

    async def _completion_result(
        run: _Run, req: p.CompletionRequest, echoes: list[str], scored: list[p.CompletionLogprobs | None]
    ) -> dict[str, Any]:
        async for _ in run.events_until_done():
            pass
        choices = [
            p.CompletionChoice(
                index=i,
                text=echoes[i] + "".join(c.text),
                logprobs=_joined(
                    scored[i], _completion_logprobs([*c.logprobs, *c.finished.stop_logprobs], len(echoes[i]))
                )
                if req.logprobs is not None
                else None,
                finish_reason=_finish_reason(c.finished),
            )
            for i, c in enumerate(run.choices)
        ]
        return p.Completion(
            id=run.id, model=server.model_name, choices=choices, usage=run.usage()
        ).model_dump()

    async def _completion_stream(
        run: _Run, req: p.CompletionRequest, echoes: list[str], scored: list[p.CompletionLogprobs | None]
    ) -> AsyncIterator[str]:
        created = p.now()

        def chunk(choices: list[p.CompletionChoice], usage: p.Usage | None = None) -> str:
            body = p.Completion(
                id=run.id, created=created, model=server.model_name, choices=choices, usage=usage
            ).model_dump()
            if not req.include_usage:
                del body["usage"]
            return _sse(body)

        offsets = [_TextOffsets(len(e)) for e in echoes]
        for i, echo in enumerate(echoes):
            if echo:
                yield chunk([p.CompletionChoice(index=i, text=echo, logprobs=scored[i])])
        texts = [
            _filled(lambda text, i=i: chunk([p.CompletionChoice(index=i, text=text)]))
            for i in range(len(echoes))
        ]
        async for i, event in run.events_until_done():
            if isinstance(event, TextChunk) and (event.text or event.logprobs):
                if req.logprobs is None:
                    yield texts[i](event.text)
                    continue
                lp = _completion_logprobs(event.logprobs or (), offsets[i])
                yield chunk([p.CompletionChoice(index=i, text=event.text, logprobs=lp)])
            elif isinstance(event, Finished) and event.reason != "cancelled":
                lp = _completion_logprobs(event.stop_logprobs, offsets[i]) if event.stop_logprobs else None
                yield chunk(
                    [p.CompletionChoice(index=i, text="", logprobs=lp, finish_reason=_finish_reason(event))]
                )
        if req.include_usage:
            yield chunk([], run.usage())
        yield _sse("[DONE]")

    async def _respond(request: Request, run: _Run, stream: bool | None, streamer, collector) -> Response:
        run.submit()
        request.state.counted = True  # by `run.record`, whatever happens next
        watcher = asyncio.create_task(_watch_disconnect(request, run.cancel))
        if not stream:
            status = 500
            try:
                body = await collector()
                status = 200 if not run.cancel.is_set() else 499  # 499: the client went away
                return JSONResponse(body)
            except Exception as err:
                status = failure(err).status
                raise
            finally:
                run.cancel.set()
                watcher.cancel()
                run.record(status)

        async def events() -> AsyncIterator[str]:
            status = 200
            parts: list[str] = []
            try:
                async for text in streamer():
                    parts.append(text)
                    if not run.more_ready:  # what was handed over together goes out in one write
                        yield "".join(parts)
                        parts.clear()
                if parts:
                    yield "".join(parts)
            except Exception as err:
                if not isinstance(err, APIError):
                    log.exception("%s: generation failed", run.id)
                told = failure(err)
                status = told.status
                yield "".join(parts) + _sse(told.body())
            finally:
                cut_short = any(c.finished is None or c.finished.reason == "cancelled" for c in run.choices)
                if status == 200 and run.cancel.is_set() and cut_short:
                    status = 499  # the client went away
                run.cancel.set()
                watcher.cancel()
                run.record(status)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @api("/v1/embeddings", "embeddings")
    async def embeddings(request: Request) -> dict[str, Any] | Response:
        server.check_auth(request)
        req: p.EmbeddingRequest = p.parse_request(p.EmbeddingRequest, await server.read_json(request))
        server.check_model(req.model)
        token_lists = await _encode_all(req.inputs(), "input")
        for i, ids in enumerate(token_lists):
            if len(ids) > engine.context_window:
                where = f"input[{i}]" if len(token_lists) > 1 else "input"  # of thousands, the one too long
                raise APIError(
                    400,
                    f"{where} has {len(ids)} tokens, but the model's context window is {engine.context_window} tokens",
                    param=where,
                    code="context_length_exceeded",
                )
        start = time.perf_counter()
        cancel = threading.Event()
        watcher = asyncio.create_task(_watch_disconnect(request, cancel))
        try:
            vectors = await asyncio.wrap_future(batcher.embed(token_lists, cancel))
        finally:
            cancel.set()
            watcher.cancel()
        request.state.counted = True
        if vectors is None:  # the client went away: the inputs left were not computed
            server.metrics.requests.labels("embeddings", "499").inc()
            log.info(
                "embeddings 499 inputs=%d total=%.2fs (the client went away)",
                len(token_lists),
                time.perf_counter() - start,
            )
            return Response(status_code=499)
        data = [
            p.Embedding(
                index=i,
                embedding=base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
                if req.encoding_format == "base64"
                else v,
            )
            for i, v in enumerate(vectors)
        ]
        tokens = sum(len(ids) for ids in token_lists)
        server.metrics.requests.labels("embeddings", "200").inc()
        server.metrics.prompt_tokens.inc(tokens)
        log.info(
            "embeddings 200 inputs=%d prompt=%d total=%.2fs",
            len(vectors),
            tokens,
            time.perf_counter() - start,
        )
        usage = p.Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens)
        return p.EmbeddingResponse(data=data, model=server.model_name, usage=usage).model_dump()

    if webui:
        _mount_webui(app, server)
    return app


def _mount_webui(app: FastAPI, server: _Server) -> None:
    """The web UI at `/` (after the API routes: a mount at `/` takes every path left), sharing the batch.
    Its chats are admitted as API requests are (--max-queue) and counted in /metrics as endpoint "webui"."""
    try:
        from vicuna.webui import mount
    except ImportError as err:
        log.warning("the web UI is not available (%s); serving the API only", err)
        return

    # The mount at `/` answers every path no route took, with Gradio's errors: a wrong /v1 path or method
    # is answered here instead, as the API answers it without the UI (405 where the path takes other methods),
    # and so is an API path called without /v1, or one of Ollama's or LitGPT's (no page of the UI's has these
    # paths).
    @app.api_route("/v1", methods=HTTP_METHODS, include_in_schema=False)
    @app.api_route("/v1/{_:path}", methods=HTTP_METHODS, include_in_schema=False)
    async def not_an_api_route(request: Request) -> None:
        allowed = {m for r in app.routes if r.matches(request.scope)[0] is Match.PARTIAL for m in r.methods}
        if allowed:
            raise StarletteHTTPException(405, headers={"Allow": ", ".join(sorted(allowed))})
        raise StarletteHTTPException(404)

    for path in WITHOUT_V1 + OLLAMA_ROUTES + LITGPT_ROUTES:
        app.api_route(path, methods=HTTP_METHODS, include_in_schema=False)(not_an_api_route)

    engine = server.engine

    def chat(messages, params, cancel):
        prompt = engine.encode_chat(messages)
        try:
            server.check_queue(1)
        except APIError as err:  # the page shows a VicunaError's message, in the browser's language
            server.metrics.requests.labels("webui", str(err.status)).inc()
            raise (ServerBusyError() if err.code == "queue_full" else VicunaError(err.message)) from None
        events = server.batcher.generate(prompt, engine.chat_params(params), cancel=cancel)
        return _counted(_shutdown_raised(events, server.batcher), server.metrics, len(prompt))

    mount(
        app,
        chat=chat,
        encode=engine.encode_chat,
        context_window=server.batcher.context_window,
        model_name=server.model_name,
        api_keys=set(server.api_keys) or None,
        max_chats=server.batcher.max_batch_size + server.max_queue,  # what check_queue admits
    )


def _shutdown_raised(events: Iterator[Any], batcher: Any) -> Iterator[Any]:
    """A web UI reply's events, where the server's shutdown (Ctrl-C) ends the reply with ShuttingDownError,
    as it ends an API request's: the page said "stopped", as if its user had pressed Stop, and kept the
    half reply. Now it says the server is shutting down and puts the message back in the box, to send again
    once the server is back."""
    for event in events:
        if isinstance(event, Finished) and event.reason == "cancelled" and batcher.closed:
            raise ShuttingDownError()
        yield event


def _counted(events: Iterator[Any], metrics: Metrics, prompt_tokens: int) -> Iterator[Any]:
    """A web UI reply's events, counted in `metrics` and logged as an API request's are, as endpoint "webui"."""
    start, first, last = time.perf_counter(), None, None
    finished: Finished | None = None
    tokens = 0  # sampled so far: what a reply cut short by the page's leaving counts
    status = 499  # the page stopped reading before the end: it went away, or Clear dropped the reply
    try:
        for event in events:
            if isinstance(event, TextChunk) and event.token_ids:
                tokens += len(event.token_ids)
                now = time.perf_counter()
                if last is not None:
                    metrics.itl.observe((now - last) / len(event.token_ids))
                first, last = first or now, now
            elif isinstance(event, Finished):
                finished, status = event, 200
            yield event
    except Exception as err:
        status = failure(err).status
        raise
    finally:  # also where the page went away mid-reply, which left no line in the log
        reasons, completion = [finished.reason if finished else "cancelled"], tokens
        if finished:
            completion = finished.completion_tokens
        ttft = None if first is None else first - start
        metrics.record("webui", status, reasons, prompt_tokens, completion, ttft)
        log_request("webui", status, prompt_tokens, completion, reasons, start, first, time.perf_counter())
