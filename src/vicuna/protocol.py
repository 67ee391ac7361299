"""The OpenAI API's request and response bodies (pydantic), and their translation to `SamplingParams`.

Requests are checked strictly: a field this server does not implement (tools, response_format
other than text, ...) is refused with an error that names it rather than ignored,
so a client never silently gets something other than what it asked for; so is a value of the wrong
type (`"max_tokens": "5"`, `5.0` or `true`), as OpenAI refuses it. Accepted and ignored, because they
only concern OpenAI's own records and routing, never the reply: `user`, and in chat requests `metadata`,
`service_tier`, `prompt_cache_key`, `safety_identifier` and `store` (false only: nothing is stored
here); and `stream_options.include_obfuscation` false (nothing is padded here). Accepted where they ask for
what this server does anyway, refused otherwise: vLLM's `skip_special_tokens` and
`spaces_between_special_tokens` true (SillyTavern sends both), chat's `modalities` `["text"]` and a
completion's empty `suffix` (code-editor plugins send both). No torch, no server here.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vicuna.config import RANDOM_SEED, SamplingParams
from vicuna.conversation import Message, MessagesError, parse_messages
from vicuna.errors import VicunaError

MAX_N = 16  # choices per request
# stop strings per request: OpenAI allows 4, but code-editor plugins (Continue's autocomplete) send their
# template's, their own and a language's keywords, some dozens; bounded as each is checked at every token
MAX_STOP = 64
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's: a 64-bit signed integer


class InvalidRequest(VicunaError):
    """A request the server will not run; `param` names the field at fault (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


# --- requests ----------------------------------------------------------------------------------


class _Strict(BaseModel):
    # strict: no "5" or 5.0 for an int. Not NaN or Infinity, which JSON has not but Python's reader takes:
    # `temperature: NaN` was refused as "less than or equal to 2", a repetition_penalty of Infinity taken
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _as_done_here(value: bool | None, done: bool, why: str) -> bool | None:
    """A field taken only with the value that asks for what this server does anyway (or left out)."""
    if value is not None and value is not done:
        raise ValueError(f"{why}; send {str(done).lower()} or leave it out")
    return value


class StreamOptions(_Strict):
    include_usage: bool = False
    # OpenAI pads streamed chunks with random text unless this is false, against observers who read a
    # reply from the sizes of encrypted chunks; this server never pads, so only false is what it does
    include_obfuscation: bool | None = None

    @field_validator("include_obfuscation")
    @classmethod
    def _no_padding(cls, value: bool | None) -> bool | None:
        return _as_done_here(value, False, "this server does not pad streamed chunks")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"only {{'type': 'text'}} is supported, not {value!r}")
        return value


def _token_id(key: str) -> int:
    """A logit_bias key as a token id: "0042" is 42. Without its leading zeros: int() refuses a string of
    thousands of digits, zeros too (a 500 after the key was accepted as 12 digits at most)."""
    return int(key.lstrip("0") or "0")


class _Sampling(_Strict):
    """The sampling fields chat and completions share (OpenAI's, then vLLM's extras)."""

    # None (left out): the one model the server serves, as vLLM takes it; SillyTavern's generic text
    # completion leaves it out until its user names a model
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)  # 0: see `sampling_params`
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 or 0 is no limit
    min_p: float | None = Field(None, ge=0, le=1)  # vLLM's; 0 is off
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = False
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    # vLLM's, true by default there: a reply's text never holds special tokens' text here (see the docstring)
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None

    @field_validator("skip_special_tokens", "spaces_between_special_tokens")
    @classmethod
    def _special_tokens_skipped(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        # what a reply's text is here: vLLM's defaults, both true
        why = f"this server always decodes replies as {info.field_name} true does (special tokens left out of the text)"
        return _as_done_here(value, True, why)

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"expected token ids as keys ('1734'), not {key!r}")
            if len(key.lstrip("0")) > 12:  # int() refuses a key of thousands of digits: a 500
                raise ValueError(f"token id {key[:12]}... ({len(key)} digits) is in no model's vocabulary")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {key} is {bias}, outside [-100, 100]")
        return value

    def bias_ids(self) -> list[int]:
        return [_token_id(key) for key in self.logit_bias or {}]

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(stops)}")
        if not all(stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _consistent(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", "stream_options")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(
        self, *, max_new_tokens: int, choice: int = 0, logprobs: int | None = None
    ) -> SamplingParams:
        """The engine's settings for one choice; `max_new_tokens` is the resolved reply budget. Each of
        `n` choices gets its own seed (seed + index), so seeded choices differ yet repeat. `top_p` 0, which
        OpenAI takes, keeps the smallest nucleus there is, the most likely token: that is greedy decoding."""
        greedy = self.top_p == 0
        min_tokens = self.min_tokens or 0
        if min_tokens > max_new_tokens:
            raise InvalidRequest(
                f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_new_tokens})", "min_tokens"
            )
        return SamplingParams(
            temperature=0.0 if greedy else 1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None or greedy else self.top_p,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_tokens,
            seed=None if self.seed in (None, RANDOM_SEED) else self.seed + choice,
            stop=tuple(self.stop or ()),
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
            logit_bias=tuple((_token_id(k), b) for k, b in (self.logit_bias or {}).items()),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    modalities: list[str] | None = None  # ["text"] only: the one kind of reply there is
    # ignored: OpenAI's records and routing (see the module's docstring)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, value: Any) -> list[Message]:
        if isinstance(value, list):  # OpenAI's newer name for the system role
            value = [
                {**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
                for m in value
            ]
        try:
            return parse_messages(value)
        except MessagesError as err:
            raise InvalidRequest(str(err), err.param) from None

    @field_validator("store")
    @classmethod
    def _store(cls, value: bool | None) -> bool | None:
        return _as_done_here(value, False, "this server does not store completions")

    @field_validator("modalities")
    @classmethod
    def _text_replies(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and value != ["text"]:
            raise ValueError(
                f'this server replies with text only; send ["text"] or leave it out, not {json.dumps(value)}'
            )
        return value

    @model_validator(mode="after")
    def _logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", "top_logprobs")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: the prompt scored, nothing generated
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None  # "" only: text after the insertion point asks for fill-in-the-middle
    best_of: Literal[1] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("expected a non-empty string, list of strings or list of token ids")
        if isinstance(value, list) and any(isinstance(p, list) and not p for p in value):
            raise ValueError("a token-id prompt must not be empty")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_insertion(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("fill-in-the-middle is not supported; send an empty suffix or leave it out")
        return value

    @model_validator(mode="after")
    def _no_reply(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest(
                "max_tokens: 0 asks for no reply, which is only for scoring a prompt: send echo true "
                "(with logprobs), or max_tokens of 1 or more",
                "max_tokens",
            )
        if self.best_of is not None and self.best_of < (self.n or 1):  # as OpenAI refuses it
            raise InvalidRequest(
                f"best_of: {self.best_of} is less than n ({self.n}): the n replies are the best of best_of "
                "candidates, so best_of must be at least n; leave it out for n replies (only best_of 1 is "
                "supported)",
                "best_of",
            )
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def logprobs_k(self) -> int | None:
        return self.logprobs


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's cap: a bound on the work (and the reply) one request can ask for


class EmbeddingRequest(_Strict):
    model: str | None = None  # left out: the served model, as in chat and completions
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        x = self.input
        if not x:  # "" too, as [""] is refused below: it got a 200 and a vector for no text
            raise InvalidRequest("input: expected a non-empty string or list", "input")
        if isinstance(x, str):
            return [x]
        if all(isinstance(i, int) for i in x):
            return [list(x)]  # type: ignore[arg-type]
        if any(not item for item in x):
            raise InvalidRequest("input: the inputs must not be empty", "input")
        if len(x) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequest(
                f"input: {len(x)} inputs, more than the {MAX_EMBEDDING_INPUTS} one request may hold; "
                "split them among requests",
                "input",
            )
        return list(x)  # type: ignore[arg-type]


UNSUPPORTED_HINTS = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "dimensions": "embeddings have the model's hidden size; dimensions is not supported",
    "suffix": "fill-in-the-middle (suffix) is not supported",
    "best_of": "only best_of 1 is supported",
    "web_search_options": "web search is not supported",
    # set in chat front-ends (Open WebUI's advanced or custom parameters, SillyTavern's samplers): what to
    # turn off there, or what to send instead
    "reasoning_effort": "this model does not reason before it replies; turn reasoning effort off",
    "num_ctx": "the context window is the model's own here (context_window in /v1/models); remove num_ctx",
    "repeat_penalty": "send repetition_penalty, which covers the prompt and the whole reply here",
}
NOT_IMPLEMENTED = (
    "this server does not implement it, and ignoring it could give another reply than asked for; leave it "
    "out (in a chat front-end, reset or remove that setting)"
)

# Fields not known here that ask for something even as {}: OpenAI searches the web with its defaults
ASKS_WHEN_EMPTY = {"web_search_options"}


UNION_MEMBERS = {  # how pydantic names them -> what a client reads
    "str": "a string",
    "list[str]": "a list of strings",
    "list[int]": "a list of token ids",
    "list[list[int]]": "a list of token-id lists",
}


def parse_request(cls: type[BaseModel], data: Any) -> Any:
    """Validate a decoded JSON body into `cls`, raising InvalidRequest that names the first bad field.

    A field we do not know is refused unless it is null or {}, which ask for nothing (LangChain's
    completions model sends `"logit_bias": {}` with every request), except where {} asks too."""
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    known = cls.model_fields
    data = {
        k: v for k, v in data.items() if k in known or v is not None and (v != {} or k in ASKS_WHEN_EMPTY)
    }
    for key in data:
        if key not in cls.model_fields:
            hint = UNSUPPORTED_HINTS.get(key, NOT_IMPLEMENTED)
            raise InvalidRequest(f"unsupported field {key!r}: {hint}", key, "unsupported_parameter")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        param, member = _param(errors[0]["loc"], data)
        message = errors[0]["msg"].removeprefix("Value error, ")
        if member is not None:  # each member of a union failed: say which were expected
            members = [_param(e["loc"], data) for e in errors]
            kinds = dict.fromkeys(UNION_MEMBERS.get(m, m) for p, m in members if p == param and m)
            message = "expected " + " or ".join(kinds)
        if param in UNSUPPORTED_HINTS and errors[0]["type"] != "missing":
            message = UNSUPPORTED_HINTS[param]
        if param and not message.startswith(param):
            message = f"{param}: {message}"
        raise InvalidRequest(message, param) from None


def _param(loc: tuple[int | str, ...], data: Any) -> tuple[str | None, str | None]:
    """An error's location as a path through the request (`stop`, `response_format.type`, `prompt[0]`),
    and the member of a union it was in: pydantic names the member it tried in the location (the `str`
    of `("stop", "str")`), which is no part of the request, so the path ends there."""
    path = ""
    for i, part in enumerate(loc):
        if isinstance(data, dict) and isinstance(part, str) and (part in data or i == 0):
            path, data = f"{path}.{part}" if path else part, data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            path, data = f"{path}[{part}]", data[part]
        else:
            return path or None, str(part)
    return path or None, None


# --- responses ---------------------------------------------------------------------------------


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions API's parallel lists."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    """Both the whole reply and each streamed chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "vicuna"
    context_window: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code)).model_dump()


__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "Completion",
    "CompletionRequest",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "InvalidRequest",
    "ModelList",
    "Usage",
    "error_body",
    "parse_request",
]
