"""The real server (uvicorn on a free port, tiny float32 model) driven by the official `openai` client."""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from tests.engine.test_batching import hold_scheduler
from vicuna.config import SamplingParams
from vicuna.conversation import Message, render
from vicuna.engine.events import Finished, TextChunk
from vicuna.errors import VicunaError
from vicuna.server.app import create_app

MODEL = "tiny"
HELLO = [{"role": "user", "content": "Hello world"}]


def asgi_post(path: str, headers: list[tuple[bytes, bytes]]) -> dict:
    """The ASGI scope of an HTTP POST to `path`, as uvicorn hands it to the app: for calling it directly."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free port; yield its base URL (also handy for benchmarks)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def served(tiny_engine):
    app = create_app(tiny_engine, model_name=MODEL, max_batch_size=8)
    with serving(app) as url:
        yield url, app


@pytest.fixture
def api(served) -> openai.OpenAI:
    return client(served[0])


def greedy(**extra):
    return {"model": MODEL, "temperature": 0, **extra}


def engine_reply(engine, messages, **params) -> tuple[str, Finished]:
    events = list(engine.chat([Message(m["role"], m["content"]) for m in messages], SamplingParams(**params)))
    return "".join(e.text for e in events[:-1]), events[-1]


def test_models_health_and_fields(served, api, tiny_engine):
    url, _ = served
    assert [m.id for m in api.models.list().data] == [MODEL]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.head(f"{url}/health").status_code == 200
    r = api.chat.completions.create(
        messages=HELLO, max_tokens=12, extra_body={"ignore_eos": True}, **greedy()
    )
    assert (
        r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL and r.created > 0
    )
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason == "length"
    text, finished = engine_reply(tiny_engine, HELLO, temperature=0, max_new_tokens=12, ignore_eos=True)
    assert choice.message.content == text
    prompt = len(tiny_engine.encode_chat([Message("user", "Hello world")]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt,
        12,
        prompt + 12,
    )


def raw_stream(url: str, body: dict) -> list[str]:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line for line in r.iter_lines() if line]


def test_stream_shape_usage_and_same_text_as_non_streamed(served, api):
    url, _ = served
    body = greedy(messages=HELLO, max_tokens=30, stream=True, stream_options={"include_usage": True})
    lines = raw_stream(url, body)
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = chunks[1:-2]
    assert all(
        set(c["choices"][0]["delta"]) == {"content"} and c["choices"][0]["finish_reason"] is None
        for c in content
    )
    last = chunks[-2]["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and all(c["usage"] is None for c in chunks[:-1])
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in content)

    whole = api.chat.completions.create(messages=HELLO, max_tokens=30, **greedy())
    assert streamed == whole.choices[0].message.content
    assert chunks[-1]["usage"] == whole.usage.model_dump(
        include={"prompt_tokens", "completion_tokens", "total_tokens"}
    )
    assert last["finish_reason"] == whole.choices[0].finish_reason

    # the official client reads the same stream
    parts = list(api.chat.completions.create(messages=HELLO, max_tokens=30, stream=True, **greedy()))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == streamed


def test_stop_strings_never_leak(api):
    full = api.chat.completions.create(
        messages=HELLO, max_tokens=40, extra_body={"ignore_eos": True}, **greedy()
    )
    text = full.choices[0].message.content
    stop = text[10:13]
    cut = text[: text.find(stop)]
    r = api.chat.completions.create(
        messages=HELLO, max_tokens=40, stop=[stop, "never-there"], extra_body={"ignore_eos": True}, **greedy()
    )
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    parts = api.chat.completions.create(
        messages=HELLO, max_tokens=40, stop=stop, stream=True, extra_body={"ignore_eos": True}, **greedy()
    )
    deltas = [p.choices[0].delta.content or "" for p in parts if p.choices]
    assert "".join(deltas) == cut and not any(stop in d for d in deltas)


def test_chinese_streams_whole_characters(api):
    messages = [{"role": "user", "content": "你好，世界！今天天气很好。"}]
    whole = (
        api.chat.completions.create(messages=messages, max_tokens=40, **greedy()).choices[0].message.content
    )
    parts = api.chat.completions.create(messages=messages, max_tokens=40, stream=True, **greedy())
    deltas = [p.choices[0].delta.content or "" for p in parts if p.choices]
    assert "".join(deltas) == whole
    # no delta splits a character: each one encodes and decodes on its own
    assert all(d.encode("utf-8").decode("utf-8") == d and "\udcff" not in d for d in deltas)


def test_n_seed_and_sampling_fields(api):
    kwargs = dict(
        model=MODEL,
        messages=HELLO,
        max_tokens=10,
        n=3,
        seed=42,
        temperature=1.0,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        user="tester",
        extra_body={"top_k": 50, "repetition_penalty": 1.1, "min_tokens": 10},
    )
    a, b = api.chat.completions.create(**kwargs), api.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert len({c.message.content for c in a.choices}) > 1  # each choice its own seed
    assert a.usage.completion_tokens == 30  # min_tokens == max_tokens: ten tokens each


def test_logprobs(api):
    r = api.chat.completions.create(
        messages=HELLO,
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
        **greedy(),
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy picks the most likely
        # the token's own bytes and text (TokenBytes), not its vocabulary entry ("▁there", "<0xE4>")
        assert bytes(t.bytes).decode("utf-8", errors="backslashreplace") == t.token
        assert "\u2581" not in t.token and not t.token.startswith("<0x")


def test_chat_logprobs_list_the_tokens_of_the_content_not_those_of_the_stop_string(api):
    """OpenAI's chat logprobs are those "of each output token returned in the content": a reply ended by a
    stop string listed the stop string's tokens too (content "Hello there", tokens "Hello there!")."""
    ask = {
        "messages": HELLO,
        "max_tokens": 12,
        "logprobs": True,
        "extra_body": {"ignore_eos": True},
        **greedy(),
    }

    def streamed(**stop) -> list[tuple[str, list[str]]]:  # each piece of the content, with its tokens
        chunks = api.chat.completions.create(**ask, **stop, stream=True)
        return [
            (c.choices[0].delta.content or "", [t.token for t in c.choices[0].logprobs.content])
            for c in chunks
            if c.choices and c.choices[0].logprobs
        ]

    pieces = streamed()
    # a character the reply first writes as a token of its own (the tiny model writes stray bytes too)
    at = next(
        i
        for i, (text, tokens) in enumerate(pieces)
        if i
        and tokens == [text]
        and text.isascii()
        and text.strip()
        and text not in "".join(t for t, _ in pieces[:i])
    )
    stop, content = pieces[at][0], "".join(text for text, _ in pieces[:at])
    before = [token for _, tokens in pieces[:at] for token in tokens]
    whole = api.chat.completions.create(**ask, stop=[stop]).choices[0]
    assert (whole.finish_reason, whole.message.content) == ("stop", content)
    assert [t.token for t in whole.logprobs.content] == before
    assert [token for _, tokens in streamed(stop=[stop]) for token in tokens] == before


def test_a_completion_token_is_among_its_top_logprobs(api):
    # OpenAI's completions list the sampled token with the `logprobs` most likely ones ("up to logprobs+1"):
    # with logprobs 0 the lists were empty, and a token outside the top k was missing from its own
    for k in (0, 2):
        r = api.completions.create(model=MODEL, prompt="Tokyo is", max_tokens=8, logprobs=k, seed=3)
        lp = r.choices[0].logprobs
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
            assert top[token] == logprob and k <= len(top) <= k + 1


def test_completion_logprob_offsets_count_characters_and_bytes_stay_whole():
    from vicuna.engine.events import TokenLogprob
    from vicuna.server.app import _completion_logprobs

    pieces = [b"\xe4\xb8\xad", b"\xe5\x9b", b"\xbd", b" hi"]  # 中, then 国 split over two tokens
    items = [TokenLogprob(i, b.decode(errors="backslashreplace"), -1.0, (), b) for i, b in enumerate(pieces)]
    out = _completion_logprobs(items, offset=5)
    assert out.text_offset == [5, 6, 6, 7]
    assert out.tokens == ["中", "\\xe5\\x9b", "\\xbd", " hi"]


def test_a_completion_continues_its_prompt_with_the_space_its_first_word_has(api):
    # LLaMA's SentencePiece decodes a first "▁word" alone as "word": prompt and completion read "whoto",
    # and every text_offset after the first token was one too high. (The tiny model's first greedy token
    # after these two prompts begins a word.)
    prompts = ["call who", "did get"]
    scored = api.completions.create(model=MODEL, prompt=prompts, max_tokens=1, temperature=0, logprobs=1)
    echoed = api.completions.create(model=MODEL, prompt=prompts, max_tokens=1, temperature=0, echo=True)
    for prompt, choice, echo in zip(prompts, scored.choices, echoed.choices, strict=True):
        token = choice.logprobs.tokens[0]
        assert token.startswith(" ") and len(token) > 1
        assert choice.text == token and echo.text == prompt + token


def model_logprobs(engine, ids: list[int]):
    """log P(ids[t] | ids[:t]) for t >= 1, from the transformers model itself, and whether each is the argmax."""
    import torch

    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    following = torch.tensor(ids[1:])
    chosen = logprobs.gather(1, following[:, None])[:, 0]
    return chosen.tolist(), (logprobs.argmax(-1) == following).tolist()


def lm_eval_loglikelihood(url: str, context: list[list[int]], continuation: list[list[int]]):
    """What lm-eval's `local-completions` sends for loglikelihood (a batch of token-id prompts, echo, one
    token generated) and how it reads the answer: token_logprobs[ctxlen:-1] summed, greedy when each
    equals the best of its top_logprobs."""
    body = {
        "model": MODEL,
        "prompt": [c + x for c, x in zip(context, continuation, strict=True)],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = []
    for choice, ctx in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), context, strict=True):
        lps = choice["logprobs"]["token_logprobs"][len(ctx) : -1]
        tops = choice["logprobs"]["top_logprobs"][len(ctx) : -1]
        out.append((sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops, strict=True))))
    return out, r.json()


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(served, api, tiny_engine):
    # lm-eval's loglikelihood tasks (multiple choice, perplexity) send echo with logprobs: it was a 400
    url = served[0]
    context = [tiny_engine.encode("The capital of France"), tiny_engine.encode("Tokyo is")]
    continuation = [tiny_engine.encode(" is Paris", add_special_tokens=False), [5, 17, 42]]
    results, body = lm_eval_loglikelihood(url, context, continuation)
    for (total, greedy_), ctx, cont in zip(results, context, continuation, strict=True):
        expected, argmax = model_logprobs(tiny_engine, ctx + cont)
        assert total == pytest.approx(sum(expected[len(ctx) - 1 :]), abs=1e-4)
        assert greedy_ == all(argmax[len(ctx) - 1 :])
    first = body["choices"][0]["logprobs"]
    ids = context[0] + continuation[0]
    assert len(first["tokens"]) == len(ids) + 1  # the prompt's tokens, then the generated one
    assert first["token_logprobs"][0] is None and first["top_logprobs"][0] is None  # nothing predicts it
    expected, _ = model_logprobs(tiny_engine, ids)
    assert first["token_logprobs"][1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    lists = (first["tokens"], first["token_logprobs"], first["top_logprobs"])
    for token, lp, top in list(zip(*lists, strict=True))[1:]:  # the best token, and the token itself
        assert top[token] == lp and len(top) <= 2
    text = body["choices"][0]["text"]
    assert text.startswith(tiny_engine.tokenizer.decode(ids, skip_special_tokens=True))
    # where each token begins in the echoed text (BOS takes no room, nor SentencePiece's first space)
    decode = tiny_engine.tokenizer.decode
    assert first["text_offset"][: len(ids)] == [
        len(decode(ids[:i], skip_special_tokens=True)) for i in range(len(ids))
    ]
    assert first["text_offset"][-1] == len(decode(ids, skip_special_tokens=True))
    # a text prompt: each token begins where it stands in the text, also after a special token typed in it
    for prompt in ("Tokyo is</s> big city", "Hello  world\nnew line"):
        r = api.completions.create(**greedy(prompt=prompt, max_tokens=0, echo=True, logprobs=0))
        lp = r.choices[0].logprobs
        for token, at in list(zip(lp.tokens, lp.text_offset, strict=True))[1:]:  # after BOS
            assert prompt[at:].startswith(token) or at == 0 and prompt.startswith(token.removeprefix(" "))
    # a text prompt, streamed: the echoed prompt's chunk carries its logprobs
    ask = greedy(prompt="Tokyo is", max_tokens=2, echo=True, logprobs=3)
    whole = api.completions.create(**ask)
    chunks = list(api.completions.create(**ask, stream=True))
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens
    ]
    assert streamed == whole.choices[0].logprobs.tokens
    assert whole.choices[0].text.startswith("Tokyo is")


def test_max_tokens_0_with_echo_scores_the_prompt_and_generates_nothing(served, api, tiny_engine):
    # OpenAI's way to score a text (perplexity scripts, older lm-eval): it was a 400 (at least 1)
    prompts = ["The capital of France is Paris", "Tokyo is big"]
    r = api.completions.create(**greedy(prompt=prompts, max_tokens=0, echo=True, logprobs=0, n=2))
    assert [c.text for c in r.choices] == [p for p in prompts for _ in range(2)]
    assert {c.finish_reason for c in r.choices} == {"length"} and r.usage.completion_tokens == 0
    for c in r.choices:
        ids = tiny_engine.encode(c.text)
        expected, _ = model_logprobs(tiny_engine, ids)
        assert len(c.logprobs.tokens) == len(ids) and c.logprobs.token_logprobs[0] is None
        assert c.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    streamed = list(api.completions.create(**greedy(prompt=prompts[0], max_tokens=0, echo=True, stream=True)))
    assert "".join(c.choices[0].text for c in streamed) == prompts[0]
    assert streamed[-1].choices[0].finish_reason == "length"
    window = tiny_engine.context_window  # a prompt only scored may fill the context window
    full = api.completions.create(**greedy(prompt=[7] * window, max_tokens=0, echo=True, logprobs=1))
    assert len(full.choices[0].logprobs.token_logprobs) == window
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(**greedy(prompt=[7] * window, max_tokens=1, echo=True, logprobs=1))
    assert info.value.code == "context_length_exceeded" and info.value.body["param"] == "prompt"
    r = httpx.post(f"{served[0]}/v1/completions", json=greedy(prompt="Hi", max_tokens=0))
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens" and "echo" in error_of(r)["message"]
    r = httpx.post(f"{served[0]}/v1/chat/completions", json=greedy(messages=HELLO, max_tokens=0))
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"


def test_a_reply_ended_by_an_end_token_lists_that_token_in_its_logprobs(tmp_path):
    # lm-eval takes the last of a one-token echo's logprobs for the generated token: where that token was
    # EOS nothing was listed, and the continuation's last token was dropped from its log-likelihood
    from tests.tiny_models import write_tiny_llama
    from vicuna.config import ModelSettings
    from vicuna.engine.loader import load_engine

    # the tiny model's most frequent greedy token (96) made its end token, so that many replies end at once
    folder = write_tiny_llama(tmp_path / "tiny", eos_token_id=96)
    engine = load_engine(ModelSettings(model_path=str(folder), device="cpu", dtype="float32"), progress=False)
    bos = engine.tokenizer.bos_token_id
    ends = [x for x in range(3, 200) if model_logprobs(engine, [bos, x, 96])[1][1]][:2]
    assert len(ends) == 2, "no prompt whose greedy next token is the end token"
    with serving(create_app(engine, model_name=MODEL)) as url:
        results, body = lm_eval_loglikelihood(url, [[bos], [bos]], [[x] for x in ends])
        for (total, _), x, choice in zip(results, ends, body["choices"], strict=True):
            assert choice["finish_reason"] == "stop" and choice["text"] == engine.tokenizer.decode([x])
            assert choice["logprobs"]["tokens"][-1] == engine.token_bytes.text(96)
            assert total == pytest.approx(model_logprobs(engine, [bos, x])[0][0], abs=1e-4)
        ask = greedy(prompt=[bos, ends[0]], max_tokens=3, logprobs=2)
        whole = client(url).completions.create(**ask)
        streamed = list(client(url).completions.create(**ask, stream=True))
    assert whole.choices[0].logprobs.tokens == [engine.token_bytes.text(96)]
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == (
        whole.choices[0].logprobs.tokens
    )


def test_a_stop_string_that_is_a_special_token_stops_the_reply(api):
    # A reply's text never holds a special token's text, so `stop: ["<|im_end|>"]` for a fine-tune whose
    # turn ends there (not its EOS) never matched: the reply ran on, into a made-up next turn, to max_tokens.
    # Here "</s>" with ignore_eos stands for it: sampled hot, the tiny model soon draws it.
    hot = {"model": MODEL, "temperature": 2, "max_tokens": 120, "extra_body": {"ignore_eos": True}}

    def tokens(r) -> list[str]:
        lp = r.choices[0].logprobs
        return lp.tokens if hasattr(lp, "tokens") else [t.token for t in lp.content]

    completion = functools.partial(api.completions.create, prompt="Hello", logprobs=0, **hot)
    chat = functools.partial(api.chat.completions.create, messages=HELLO, logprobs=True, **hot)
    for create in (completion, chat):
        drawn = next((s for s in range(30) if "</s>" in tokens(create(seed=s))[:-1]), None)
        assert drawn is not None, "no reply drew </s>"
        before = tokens(create(seed=drawn))
        r = create(seed=drawn, stop=["</s>"])
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == before.index("</s>") + 1 < 120


def test_completions(api, tiny_engine):
    prompts = ["The capital of France", "Tokyo is"]
    r = api.completions.create(
        model=MODEL,
        prompt=prompts,
        max_tokens=8,
        n=2,
        echo=True,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.text.startswith(prompts[c.index // 2]) for c in r.choices)
    assert (
        r.usage.prompt_tokens == sum(len(tiny_engine.encode(p)) for p in prompts)
        and r.usage.completion_tokens == 32
    )
    plain = api.completions.create(model=MODEL, prompt=prompts[0], max_tokens=8, temperature=0)
    assert r.choices[0].text == prompts[0] + plain.choices[0].text
    streamed = api.completions.create(
        model=MODEL,
        prompt=prompts[0],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    tokens = api.completions.create(
        model=MODEL, prompt=tiny_engine.encode(prompts[0]), max_tokens=8, temperature=0
    )
    assert tokens.choices[0].text == plain.choices[0].text


def test_embeddings(api, tiny_engine):
    r = api.embeddings.create(model=MODEL, input=["Hello", "Tokyo is big"])  # the client asks for base64
    f = api.embeddings.create(model=MODEL, input="Hello", encoding_format="float")
    hidden = tiny_engine.model.config.hidden_size
    assert [len(d.embedding) for d in r.data] == [hidden, hidden]
    assert r.data[0].embedding == pytest.approx(f.data[0].embedding, abs=1e-6)
    assert sum(x * x for x in f.data[0].embedding) == pytest.approx(1, abs=1e-4)
    assert r.usage.prompt_tokens == len(tiny_engine.encode("Hello")) + len(tiny_engine.encode("Tokyo is big"))


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


def test_errors(served, api, tiny_engine):
    url, _ = served
    r = httpx.post(
        f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in error_of(r)["message"]
    for body, param in [
        (greedy(messages=HELLO, temperature=-1), "temperature"),
        (greedy(messages=HELLO, n=0), "n"),
        (greedy(messages=HELLO, tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
        (greedy(messages=HELLO, response_format={"type": "json_object"}), "response_format.type"),
        (greedy(messages=HELLO, logit_bias={"five": 1}), "logit_bias"),
        (greedy(), "messages"),
    ]:
        r = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert r.status_code == 400 and error_of(r)["param"] == param, r.text
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(
            messages=HELLO, tools=[{"type": "function", "function": {"name": "f"}}], **greedy()
        )
    assert "tools" in info.value.message
    with pytest.raises(openai.NotFoundError) as info:
        api.chat.completions.create(model="gpt-4", messages=HELLO)
    assert info.value.code == "model_not_found" and "gpt-4" in info.value.message
    window = tiny_engine.context_window
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(messages=HELLO, max_tokens=window, **greedy())
    prompt = len(tiny_engine.encode_chat([Message("user", "Hello world")]))
    message = info.value.message
    assert info.value.code == "context_length_exceeded"
    assert str(prompt) in message and str(window) in message and str(prompt + window) in message
    r = httpx.get(f"{url}/v1/nothing-here")
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"


def test_a_token_id_outside_the_vocabulary_is_a_400_naming_the_field(api, tiny_engine):
    vocab = tiny_engine.model.config.vocab_size
    # of several prompts, the one at fault is named, as other errors of one among them name it
    for prompt, bad, param in (([vocab], vocab, "prompt"), ([[1, 2], [3, -1]], -1, "prompt[1]")):
        with pytest.raises(openai.BadRequestError) as info:
            api.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
        assert info.value.body["param"] == param and info.value.body["message"].startswith(
            f"{param}: token id {bad} "
        )
    for inputs, param in (([[vocab + 5]], "input"), ([[1], [2], [vocab + 5]], "input[2]")):
        with pytest.raises(openai.BadRequestError) as info:
            api.embeddings.create(model=MODEL, input=inputs)
        assert info.value.body["param"] == param and str(vocab + 5) in info.value.message
    last = api.completions.create(model=MODEL, prompt=[vocab - 1], max_tokens=2)  # the last id is fine
    assert last.choices[0].finish_reason


def test_an_empty_text_is_a_400_naming_the_field(api, tiny_engine, monkeypatch):
    monkeypatch.setattr(tiny_engine, "encode", lambda text: [5] * len(text))  # "": a tokenizer without BOS
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(model=MODEL, prompt=["x", ""], max_tokens=2)
    assert info.value.body["param"] == "prompt[1]" and "empty" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        api.embeddings.create(model=MODEL, input="")
    assert info.value.body["param"] == "input" and "empty" in info.value.message


def test_wrong_api_paths_and_methods_get_openai_errors_with_the_web_ui_mounted_too(tiny_engine):
    from fastapi.testclient import TestClient

    answers = {}
    for webui in (False, True):
        app = create_app(tiny_engine, model_name=MODEL, webui=webui)
        try:
            http = TestClient(app)
            assert http.get("/v1/models").status_code == 200
            answers[webui] = [
                (r.status_code, r.headers.get("allow"), error_of(r))
                for r in (http.request(method, path) for method, path in WRONG_API_CALLS)
            ]
        finally:
            app.state.batcher.close()
    assert answers[True] == answers[False]
    assert [(status, allow) for status, allow, _ in answers[True]] == [
        (405, "POST"),
        (405, "GET"),
        (404, None),
        (404, None),
        (404, None),
        (404, None),
        (404, None),
        (404, None),
        (404, None),
        (404, None),
    ]
    # a base_url without /v1 (the web UI's mount at / answered it with Gradio's bare "Not Found")
    for _, _, error in answers[True][-2:]:
        assert error["message"].endswith("the path lacks /v1: add it to the end of the base URL"), error
    assert "lacks /v1" not in answers[True][2][2]["message"]
    # an Ollama connection's first calls (its list of models, its version): told what to connect as
    for _, _, error in answers[True][-4:-2]:
        assert error["message"].endswith(
            "it is Ollama's own API, which this server does not speak: connect the client as to an "
            "OpenAI-compatible API, its base URL ending in /v1"
        ), error
    # a client of `litgpt serve` (its POST /predict): told where its prompt goes
    assert answers[True][-5][2]["message"].endswith(
        "it is LitGPT's own API, which this server does not speak: send its prompt as "
        '{"prompt": ...} to POST /v1/completions, or as messages to POST /v1/chat/completions'
    )


WRONG_API_CALLS = [
    ("GET", "/v1/chat/completions"),
    ("DELETE", "/v1/models"),
    ("POST", "/v1/nothing-here"),
    ("GET", "/v1/chat/completions/extra"),
    ("GET", "/v1"),
    ("POST", "/predict"),  # LitGPT's
    ("GET", "/api/tags"),  # Ollama's
    ("POST", "/api/chat"),
    ("POST", "/chat/completions"),
    ("GET", "/models"),
]


def test_a_prompt_that_fills_the_context_window_is_refused_naming_the_prompt(served, tiny_engine):
    """Not `max_tokens`, which no value would help, nor a reply of 1 token, which nobody asked for."""
    url, _ = served
    window = tiny_engine.context_window
    long = "你好，世界！今天天气很好。" * 200
    prompt = len(tiny_engine.encode_chat([Message("user", long)]))
    assert prompt > window
    for path, body, param in [
        ("chat/completions", greedy(messages=[{"role": "user", "content": long}]), "messages"),
        ("chat/completions", greedy(messages=[{"role": "user", "content": long}], max_tokens=8), "messages"),
        ("completions", greedy(prompt=long, max_tokens=8), "prompt"),
    ]:
        error = error_of(httpx.post(f"{url}/v1/{path}", json=body))
        assert (error["code"], error["param"]) == ("context_length_exceeded", param)
        assert (
            f"tokens and leaves no room for a reply in the model's context window of {window}"
            in (error["message"])
        )
        assert "new tokens were asked for" not in error["message"]


def test_of_several_prompts_the_one_too_long_for_the_window_is_named(served, tiny_engine):
    """An evaluation harness sends prompts by the list: one of them too long was refused as "the prompt
    has N tokens", naming `prompt` (or `input`), so the client could not tell which to shorten."""
    url, _ = served
    window = tiny_engine.context_window
    ok, long, near = [5] * 10, [5] * (window + 1), [5] * (window - 4)
    for path, body, param, start in [
        ("completions", greedy(prompt=[ok, long, ok]), "prompt[1]", "prompt[1]: the prompt has"),
        ("completions", greedy(prompt=[ok, near], max_tokens=8), "max_tokens", "prompt[1]: the prompt has"),
        ("completions", greedy(prompt=long), "prompt", "the prompt has"),
        ("embeddings", {"model": MODEL, "input": [ok, ok, long]}, "input[2]", "input[2] has"),
        ("embeddings", {"model": MODEL, "input": long}, "input", "input has"),
    ]:
        error = error_of(httpx.post(f"{url}/v1/{path}", json=body, timeout=60))
        assert (error["code"], error["param"]) == ("context_length_exceeded", param)
        assert error["message"].startswith(start), error["message"]


def test_a_completion_without_max_tokens_near_the_end_of_the_window_gets_the_room_left(served, tiny_engine):
    """OpenAI's default of 16 new tokens, where the prompt left fewer, was refused naming max_tokens,
    which the client had not sent."""
    url, _ = served
    window = tiny_engine.context_window
    ids = [tiny_engine.encode("Hello")[-1]] * (window - 5)
    r = httpx.post(f"{url}/v1/completions", json=greedy(prompt=ids, ignore_eos=True), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5
    asked = greedy(prompt=ids, max_tokens=16)
    assert error_of(httpx.post(f"{url}/v1/completions", json=asked))["param"] == "max_tokens"  # as asked


def test_a_body_larger_than_the_context_window_can_use_is_a_413_before_it_is_read(served, tiny_engine):
    url, _ = served
    limit = 1024 * tiny_engine.context_window
    big = json.dumps(greedy(messages=[{"role": "user", "content": "x" * limit}])).encode()
    with httpx.Client(timeout=60) as http:  # one connection, kept for the next request
        for path in ("chat/completions", "completions", "embeddings"):
            for content in (big, iter([big[: limit // 2], big[limit // 2 :]])):  # declared length; chunked
                r = http.post(
                    f"{url}/v1/{path}", content=content, headers={"content-type": "application/json"}
                )
                assert r.status_code == 413 and error_of(r)["code"] == "request_too_large", r.text
                assert str(limit) in error_of(r)["message"]
        assert (
            http.post(f"{url}/v1/chat/completions", json=greedy(messages=HELLO, max_tokens=2)).status_code
            == 200
        )
    r = httpx.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": "x" * (limit // 2)})
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"  # under the limit: read


def test_a_model_is_retrieved_by_its_name_even_one_with_a_slash(tiny_engine):
    with serving(create_app(tiny_engine, model_name="lmsys/vicuna-7b-v1.5", api_keys=["k"])) as url:
        card = client(url, "k").models.retrieve("lmsys/vicuna-7b-v1.5")
        assert (card.id, card.object) == ("lmsys/vicuna-7b-v1.5", "model")
        assert card.context_window == tiny_engine.context_window
        with pytest.raises(openai.NotFoundError) as info:
            client(url, "k").models.retrieve("gpt-4")
        assert info.value.body["code"] == "model_not_found"
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.retrieve("lmsys/vicuna-7b-v1.5")


def test_aliases_answer_for_the_model_and_replies_carry_its_name(tiny_engine):
    # `--model-name vicuna-7b,gpt-3.5-turbo`: a tool that asks for "gpt-3.5-turbo" is served (FastChat's
    # --model-names, vLLM's --served-model-name); the reply names the model by its first name, as vLLM's do
    with serving(create_app(tiny_engine, model_name="vicuna-7b", aliases=["gpt-3.5-turbo"])) as url:
        api = client(url)
        assert [m.id for m in api.models.list().data] == ["vicuna-7b", "gpt-3.5-turbo"]
        assert api.models.retrieve("gpt-3.5-turbo").id == "gpt-3.5-turbo"
        reply = api.chat.completions.create(model="gpt-3.5-turbo", messages=HELLO, max_tokens=2)
        assert reply.model == "vicuna-7b"
        with pytest.raises(openai.NotFoundError) as info:
            api.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
        assert "serves 'vicuna-7b' (also as 'gpt-3.5-turbo')" in info.value.body["message"]


def test_model_name_flag_reads_aliases_after_commas(capsys):
    from vicuna.cli import main
    from vicuna.server import model_names

    assert model_names("vicuna-7b, gpt-3.5-turbo") == ["vicuna-7b", "gpt-3.5-turbo"]
    for bad, said in (("a,,b", "has an empty name"), ("a,a", "names one model twice")):
        with pytest.raises(SystemExit) as stop:
            main(["serve", "--model-path", "m", "--model-name", bad])
        assert stop.value.code == 2 and said in capsys.readouterr().err


def test_api_keys(tiny_engine):
    with serving(create_app(tiny_engine, model_name=MODEL, api_keys=["k1", "k2"])) as url:
        for key in ("", "wrong"):
            r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
            assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").chat.completions.create(messages=HELLO, max_tokens=2, **greedy())
        assert client(url, "k2").chat.completions.create(messages=HELLO, max_tokens=2, **greedy()).choices
        assert httpx.get(f"{url}/health").status_code == 200  # monitoring needs no key
    # keys are compared as bytes (in constant time): a key's beginning is not the key, any text is a key
    # "à" is C3 A0 in UTF-8: read as Latin-1 its last byte is a no-break space, which str.strip() removes
    with serving(create_app(tiny_engine, model_name=MODEL, api_keys=["密钥-k1", "clé-à"])) as url:
        keys = {"密钥-k1": 200, "密钥": 401, "密钥-k1x": 401, "clé-à": 200, "clé-": 401}
        for key, status in keys.items():
            r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}".encode()})
            assert r.status_code == status, key


def test_browser_pages_from_allowed_origins_may_call_the_api(tiny_engine):
    page, other = "https://chat.example.com", "https://elsewhere.example"
    app = create_app(tiny_engine, model_name=MODEL, api_keys=["k"], allowed_origins=[page])
    with serving(app) as url:
        asks = {"Access-Control-Request-Method": "POST"}
        asks["Access-Control-Request-Headers"] = "authorization,content-type,x-stainless-os"
        r = httpx.options(f"{url}/v1/chat/completions", headers={"Origin": page, **asks})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        key = {"Authorization": "Bearer k"}
        for stream in (False, True):
            body = greedy(messages=HELLO, max_tokens=2, stream=stream)
            r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Origin": page, **key})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        r = httpx.get(f"{url}/v1/models", headers={"Origin": other, **key})
        assert "access-control-allow-origin" not in r.headers
    with serving(create_app(tiny_engine, model_name=MODEL)) as url:  # by default, no page of another origin
        r = httpx.get(f"{url}/v1/models", headers={"Origin": page})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_the_web_ui_answers_no_page_of_another_origin_but_the_allowed_ones(tiny_engine):
    page, other = "https://chat.example.com", "https://elsewhere.example"
    asks = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    for allowed in ([], [page]):
        app = create_app(tiny_engine, model_name=MODEL, webui=True, allowed_origins=allowed)
        with serving(app) as url:
            # reached by a name other than localhost, as on a LAN: Gradio's own CORS let every origin in
            lan = {"Host": "192.0.2.7:8000"}
            for path in ("/config", "/gradio_api/info"):
                r = httpx.get(f"{url}{path}", headers={"Origin": other, **lan})
                assert r.status_code == 200 and "access-control-allow-origin" not in r.headers, path
            r = httpx.options(f"{url}/gradio_api/call/chat", headers={"Origin": other, **asks, **lan})
            assert "access-control-allow-origin" not in r.headers
            r = httpx.options(f"{url}/gradio_api/call/chat", headers={"Origin": page, **asks, **lan})
            assert r.headers.get("access-control-allow-origin") == (page if allowed else None)
            data = {"data": ["", [], None, "", 0.7, 1.0, 16, ""]}  # the page itself still works
            assert httpx.post(f"{url}/gradio_api/call/chat", json=data, headers=lan).status_code == 200


def test_allowed_origins_as_fastchat_writes_them_or_with_a_path_are_read_or_refused(capsys):
    from vicuna.cli import command_parser

    def origins(value):
        return command_parser("serve").parse_args(["--allowed-origins", value]).allowed_origins

    assert origins('["*"]') == ["*"]  # FastChat's JSON list, once taken for an origin named '["*"]'
    assert origins('["https://a.example", "http://localhost:3000"]') == [
        "https://a.example",
        "http://localhost:3000",
    ]
    assert origins("https://a.example, https://b.example:8443") == [
        "https://a.example",
        "https://b.example:8443",
    ]
    assert origins("") == []
    for never_sent in (
        "https://chat.example.com/",
        "chat.example.com",
        '["*"',
    ):  # a browser's Origin is neither
        with pytest.raises(SystemExit):
            origins(never_sent)
        assert "argument --allowed-origins: " in capsys.readouterr().err


def test_allowed_origins_are_read_as_a_browser_sends_them():
    """A browser's Origin is lowercase and leaves out the scheme's default port; the CORS check compares
    strings, so 'https://Chat.Example.com' or 'https://chat.example.com:443' was taken, the server started,
    and every page of that origin was refused by the browser without a word."""
    from vicuna.cli import command_parser

    def origins(value):
        return command_parser("serve").parse_args(["--allowed-origins", value]).allowed_origins

    assert origins("https://Chat.Example.com,https://chat.example.com:443,HTTP://a.example:80") == [
        "https://chat.example.com",
        "https://chat.example.com",
        "http://a.example",
    ]
    assert origins("https://a.example:8443,http://a.example:443") == [
        "https://a.example:8443",
        "http://a.example:443",
    ]


def wait_for(predicate, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_queue_full_is_429_with_retry_after(tiny_engine):
    app = create_app(tiny_engine, model_name=MODEL, max_batch_size=1, max_queue=1)
    batcher = app.state.batcher
    step = batcher._rows.step
    batcher._rows.step = lambda tokens: (time.sleep(0.01), step(tokens))[
        1
    ]  # 900 tokens: 9 s, not to end first
    long = greedy(messages=HELLO, max_tokens=900, stream=True, extra_body={"ignore_eos": True})
    with serving(app) as url:
        api = client(url)
        running = api.chat.completions.create(**long)
        next(iter(running))
        assert wait_for(lambda: batcher.running == 1)
        waiting = api.chat.completions.create(**long)
        assert wait_for(lambda: batcher.waiting == 1)
        r = httpx.post(f"{url}/v1/chat/completions", json=greedy(messages=HELLO, max_tokens=2))
        assert r.status_code == 429 and r.headers["retry-after"].isdigit()
        assert error_of(r)["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            api.chat.completions.create(messages=HELLO, max_tokens=2, **greedy())
        running.close()
        waiting.close()
        assert wait_for(lambda: batcher.running == 0 and batcher.waiting == 0)


def test_a_request_for_more_replies_than_the_server_ever_takes_is_a_400_not_a_429_to_retry(tiny_engine):
    app = create_app(tiny_engine, model_name=MODEL, max_batch_size=2, max_queue=1)
    with serving(app) as url:  # an idle server: a 429 would say "retry", which never helps
        api = client(url)
        with pytest.raises(openai.BadRequestError) as info:
            api.completions.create(model=MODEL, prompt=["a", "b", "c", "d"], max_tokens=2)
        assert info.value.body["param"] == "prompt" and "4 replies" in info.value.message
        for create in (
            lambda: api.chat.completions.create(messages=HELLO, n=4, max_tokens=2, **greedy()),
            lambda: api.completions.create(model=MODEL, prompt="a", n=4, max_tokens=2),  # one prompt: n
        ):
            with pytest.raises(openai.BadRequestError) as info:
                create()
            assert info.value.body["param"] == "n" and info.value.code == "too_many_replies"
        assert len(api.completions.create(model=MODEL, prompt=["a", "b", "c"], max_tokens=2).choices) == 3
        assert app.state.batcher.running == 0 and app.state.batcher.waiting == 0


def ends_of(batcher) -> list[Finished]:
    """How each reply added to `batcher` from now on ends, as the batcher ends it (the HTTP side counts a
    reply whose client left as cancelled, whether or not the batcher stopped it)."""
    ends: list[Finished] = []
    add = batcher.add

    def noting_the_end(ids, params, sink, cancel):
        def note(event):
            if isinstance(event, Finished):
                ends.append(event)
            sink(event)

        add(ids, params, note, cancel=cancel)

    batcher.add = noting_the_end
    return ends


def test_a_request_refused_part_way_leaves_nothing_running(tiny_engine):
    app = create_app(tiny_engine, model_name=MODEL, max_batch_size=4)
    batcher = app.state.batcher
    step = batcher._rows.step
    batcher._rows.step = lambda tokens: (time.sleep(0.01), step(tokens))[1]  # 900 tokens: 9 s
    ends, add = ends_of(batcher), batcher.add

    def add_then_refuse(ids, params, sink, cancel):  # the second choice is refused once the first is queued
        if batcher.running + batcher.waiting:
            raise VicunaError("refused")
        add(ids, params, sink, cancel=cancel)

    batcher.add = add_then_refuse
    with serving(app) as url:
        body = {"model": MODEL, "prompt": "Hello world", "n": 2, "max_tokens": 900, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 400 and error_of(r)["message"] == "refused"
        assert wait_for(
            lambda: ends, timeout=60
        )  # the first choice ended: cut short, or after its 900 tokens
        assert ends[0].reason == "cancelled" and ends[0].completion_tokens < 900
        assert wait_for(lambda: batcher.running == 0 and batcher.waiting == 0)


def test_max_queue_0_serves_what_a_free_row_takes_at_once(tiny_engine):
    app = create_app(tiny_engine, model_name=MODEL, max_batch_size=1, max_queue=0)
    batcher = app.state.batcher
    step, refused = batcher._rows.step, threading.Event()
    with serving(app) as url:
        api = client(url)
        assert api.chat.completions.create(messages=HELLO, max_tokens=2, **greedy()).choices
        # the long reply takes no step until the next request is answered: alone, its 900 tokens took
        # ~0.1 s, at times over before that request came, which was then served
        batcher._rows.step = lambda tokens: (refused.wait(60), step(tokens))[1]
        long = greedy(messages=HELLO, max_tokens=900, stream=True, extra_body={"ignore_eos": True})
        running = api.chat.completions.create(**long)
        try:
            next(iter(running))
            assert wait_for(lambda: batcher.running == 1)
            with pytest.raises(openai.RateLimitError):  # no row free, and none may wait
                api.chat.completions.create(messages=HELLO, max_tokens=2, **greedy())
        finally:
            refused.set()
        running.close()
        assert wait_for(lambda: batcher.running == 0)


def webui_chat(url: str, message: str, max_tokens: int, language: str = "en") -> list[tuple[str, str]]:
    """Send `message` as the web page does (Gradio's `chat` endpoint), from a browser that prefers `language`:
    the (event, data) lines of its answer."""
    # text, conversation, exchanges left out and the API key (States: the session's own are used), system,
    # sliders
    data = [message, [], None, "", 0.0, 1.0, max_tokens, ""]
    headers = {"Accept-Language": language}
    event_id = httpx.post(f"{url}/gradio_api/call/chat", json={"data": data}, headers=headers).json()[
        "event_id"
    ]
    answer = httpx.get(f"{url}/gradio_api/call/chat/{event_id}", timeout=60).text
    # each event is two lines, "event: NAME" and "data: JSON"
    return re.findall(r"^event: (.*)\ndata: (.*)$", answer, re.M)


def test_web_ui_chats_are_admitted_and_counted_as_api_requests(tiny_engine, caplog):
    app = create_app(tiny_engine, model_name=MODEL, max_batch_size=1, max_queue=0, webui=True)
    batcher = app.state.batcher
    step = batcher._rows.step
    batcher._rows.step = lambda tokens: (time.sleep(0.01), step(tokens))[1]  # 900 tokens: 9 s
    with serving(app) as url:
        long = greedy(messages=HELLO, max_tokens=900, stream=True, extra_body={"ignore_eos": True})
        running = client(url).chat.completions.create(**long)
        next(iter(running))
        assert wait_for(lambda: batcher.running == 1)
        # the one row is taken and none may wait: the page says so, and nothing is queued
        event, data = webui_chat(url, "Hello", 4)[-1]
        assert event == "error" and "The server is busy with other replies: try again shortly." in data
        # in the language of the page, which has no use for the API's words (429, --max-queue)
        event, data = webui_chat(url, "你好", 4, language="zh-CN,zh;q=0.9")[-1]
        assert event == "error" and json.loads(data)["error"] == "服务器正忙于生成其他回复：请稍后重试。"
        assert batcher.waiting == 0
        running.close()
        assert wait_for(lambda: batcher.running == 0)

        counted = ("vicuna_completion_tokens_total", "vicuna_time_to_first_token_seconds_count")
        before = [metric(url, name) for name in counted]
        with caplog.at_level(logging.INFO, logger="vicuna"):
            event, data = webui_chat(url, "my secret plans", 4)[-1]
        assert event == "complete" and "4 tokens" in data
        assert metric(url, 'vicuna_requests_total{endpoint="webui",status="200"}') == 1
        assert [metric(url, name) - b for name, b in zip(counted, before, strict=True)] == [4, 1]
    # one line, as an API request's, and the conversation is not in the log
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("webui ")]
    assert re.fullmatch(
        r"webui 200 prompt=\d+ completion=4 ttft=\S+s decode=\S+ tok/s total=\S+s finish=length", line
    )
    assert not [r for r in caplog.records if "secret" in r.getMessage()]


def test_every_request_is_counted_once_with_its_status_refused_ones_too(tiny_engine):
    """Only requests that ran were counted in /metrics: a busy server's 429s (API and web UI), 400s and
    404s were missing, so its refusals could not be seen or alerted on."""
    app = create_app(tiny_engine, model_name=MODEL, max_batch_size=1, max_queue=0, webui=True)
    batcher = app.state.batcher
    release = hold_scheduler(batcher, hold_s=30, start_s=10)  # the scheduler admits nobody meanwhile
    with serving(app) as url:
        statuses: list[int] = []

        def post(path: str, body: dict) -> None:
            statuses.append(httpx.post(f"{url}/v1/{path}", json=body, timeout=60).status_code)

        waiting = threading.Thread(
            target=post, args=("chat/completions", greedy(messages=HELLO, max_tokens=2))
        )
        waiting.start()  # it takes the one place there is: the others are refused
        assert wait_for(lambda: batcher.waiting == 1)
        post("chat/completions", greedy(messages=HELLO, max_tokens=2))
        post("completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2})
        assert webui_chat(url, "Hello", 2)[-1][0] == "error"
        post("chat/completions", greedy(messages=HELLO, temperature=-1))
        post("completions", {"model": "another", "prompt": "Hello"})
        post("embeddings", {"model": MODEL, "input": [10**6]})  # no such token
        release.set()
        waiting.join(60)
        assert statuses == [429, 429, 400, 404, 400, 200]
        counted = {
            (s.labels["endpoint"], s.labels["status"]): s.value
            for family in app.state.metrics.registry.collect()
            if family.name == "vicuna_requests"
            for s in family.samples
            if s.name == "vicuna_requests_total"
        }
    assert counted == {
        ("chat", "200"): 1,
        ("chat", "429"): 1,
        ("chat", "400"): 1,
        ("completions", "429"): 1,
        ("completions", "404"): 1,
        ("embeddings", "400"): 1,
        ("webui", "429"): 1,
    }


def test_a_client_gone_while_sending_its_body_is_counted_499_not_500(tiny_engine):
    """A client that left while its body was read (a timeout during a large upload) was counted in
    /metrics as a chat 500, a server error to alert on, and logged as an internal error."""
    import asyncio

    app = create_app(tiny_engine, model_name=MODEL)
    received = [
        {"type": "http.request", "body": b'{"model": "ti', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return received.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = asgi_post(
        "/v1/chat/completions", [(b"content-type", b"application/json"), (b"content-length", b"100")]
    )
    asyncio.run(app(scope, receive, send))
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
    sample = app.state.metrics.registry.get_sample_value
    assert sample("vicuna_requests_total", {"endpoint": "chat", "status": "499"}) == 1
    assert sample("vicuna_requests_total", {"endpoint": "chat", "status": "500"}) is None


def test_a_web_ui_reply_the_page_left_counts_the_tokens_it_had_and_logs_its_line(tiny_engine, caplog):
    """A page closed mid-reply was counted with 0 completion tokens, however many it had been sent; and it left
    no line in the log, where an API stream its client left logs one (499)."""
    from vicuna.server.app import Metrics, _counted

    metrics = Metrics(create_app(tiny_engine, model_name=MODEL).state.batcher)
    events = _counted(
        iter([TextChunk("Once", (5,)), TextChunk(" upon a", (6, 7)), TextChunk("x", (8,))]), metrics, 3
    )
    assert [next(events).text for _ in range(2)] == ["Once", " upon a"]
    with caplog.at_level(logging.INFO, logger="vicuna.server"):
        events.close()  # the page went away
    sample = metrics.registry.get_sample_value
    assert sample("vicuna_requests_total", {"endpoint": "webui", "status": "499"}) == 1
    assert sample("vicuna_completion_tokens_total") == 3
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("webui 499 prompt=3 completion=3 ttft=") and line.endswith(" finish=cancelled")


def test_requests_that_arrive_together_take_the_free_rows_before_any_counts_as_queued(tiny_engine):
    app = create_app(tiny_engine, model_name=MODEL, max_batch_size=4, max_queue=0)
    batcher = app.state.batcher
    release = hold_scheduler(batcher, hold_s=30, start_s=10)  # the scheduler admits nobody meanwhile
    with serving(app) as url:
        statuses: list[int] = []

        def ask() -> None:
            body = greedy(messages=HELLO, max_tokens=2)
            statuses.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code)

        threads = [threading.Thread(target=ask) for _ in range(5)]
        for t in threads:
            t.start()
        assert wait_for(lambda: batcher.waiting == 4 and len(statuses) == 1)
        assert statuses == [429]  # four rows are free for four requests; the fifth would wait
        release.set()
        for t in threads:
            t.join(60)
    assert sorted(statuses) == [200, 200, 200, 200, 429]


def test_a_long_prompt_is_tokenized_off_the_event_loop(tiny_engine, monkeypatch):
    # a 10 MB body took 5.5 s to tokenize on 2 cores: meanwhile nothing else may stop being served
    app = create_app(tiny_engine, model_name=MODEL)
    encode, tokenizing, done = tiny_engine.encode, threading.Event(), threading.Event()

    def slow_encode(text: str, *args: bool) -> list[int]:
        tokenizing.set()
        done.wait(30)
        return encode(text, *args)

    monkeypatch.setattr(tiny_engine, "encode", slow_encode)
    with serving(app) as url:
        answers: list[int] = []

        def ask(path: str, body: dict) -> None:
            answers.append(httpx.post(f"{url}/v1/{path}", json=body, timeout=60).status_code)

        for path, body in (
            ("chat/completions", greedy(messages=HELLO, max_tokens=2)),
            ("completions", {"model": MODEL, "prompt": "Hello world", "max_tokens": 2}),
            ("embeddings", {"model": MODEL, "input": "Hello world"}),
        ):
            tokenizing.clear()
            done.clear()
            post = threading.Thread(target=ask, args=(path, body))
            post.start()
            assert tokenizing.wait(10)
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # while the prompt is tokenized
            done.set()
            post.join(60)
        assert answers == [200, 200, 200]


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    found = re.findall(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(found[0]) if found else 0.0


def test_disconnect_cancels_generation(tiny_engine):
    # A step of ~2 ms, as a real model's: the tiny model alone makes its 900 tokens in ~0.1 s, with its
    # text held back 20 ms at a time often before the client had read its first lines. From the 400th
    # step on, none before the client has gone: the reply cannot end on its own first.
    app = create_app(tiny_engine, model_name=MODEL)
    rows = app.state.batcher._rows
    step, steps, gone = rows.step, itertools.count(1), threading.Event()
    rows.step = lambda tokens: (time.sleep(0.002), next(steps) < 400 or gone.wait(60), step(tokens))[2]
    ends = ends_of(app.state.batcher)
    cancelled = 'vicuna_replies_finished_total{reason="cancelled"}'
    body = greedy(messages=HELLO, max_tokens=900, stream=True, extra_body={"ignore_eos": True})
    body.update(body.pop("extra_body"))
    with serving(app) as url:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()
                for _ in range(4):
                    next(lines)
        finally:
            gone.set()
        # the client is gone: the reply ends long before its 900 tokens and frees its row
        assert wait_for(lambda: ends, timeout=60)
        assert ends[0].reason == "cancelled" and ends[0].completion_tokens < 900
        assert wait_for(lambda: metric(url, cancelled) == 1)
        assert wait_for(lambda: app.state.batcher.running == 0)
        assert metric(url, 'vicuna_requests_total{endpoint="chat",status="499"}') == 1
        assert metric(url, "vicuna_completion_tokens_total") >= 1  # the tokens sent before it left count


def test_a_server_after_many_requests_holds_nothing_of_them(tiny_engine):
    """A soak in small: replies streamed and not, of several choices, with logprobs and stop strings, streams
    left after their first lines, refused requests, from 4 clients at once. Once they are answered the
    server keeps nothing of theirs, however many came: no request's state, no event held or timed for a
    reply, nothing waiting; the finished rows kept for prompts that begin alike stay within their share
    of the KV budget; /metrics has the same series after 3 rounds as after 1."""
    import gc

    from vicuna.server.app import _Run

    app = create_app(tiny_engine, model_name=MODEL, max_batch_size=4, max_queue=64)
    batcher, words = app.state.batcher, ["Hello", "world", "Paris", "你好", "capital"]

    def one(c: httpx.Client, i: int) -> None:
        text = " ".join(words[(i * j) % 5] for j in range(1, 2 + i % 7))
        chat = {"messages": [{"role": "user", "content": text}], "max_tokens": 1 + i % 5}
        if i % 9 == 0:  # refused: a model not served, or a reply longer than the window
            c.post("/v1/chat/completions", json={**chat, "model": "nosuch"})
            c.post("/v1/completions", json={"prompt": text, "max_tokens": 10**6})
        elif i % 3 == 0:  # left after its first lines, long before its end
            body = {**chat, "max_tokens": 300, "n": 2, "stream": True, "ignore_eos": True}
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                next(r.iter_lines())
        elif i % 3 == 1:
            body = {
                "prompt": text,
                "max_tokens": 4,
                "n": 2,
                "logprobs": 2,
                "stop": ["e"],
                "stream": i % 2 == 0,
            }
            c.post("/v1/completions", json=body).read()
        else:
            c.post("/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 1}).read()

    def soak(requests: int) -> None:
        def client_of(k: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                for i in range(k, requests, 4):
                    one(c, i)

        threads = [threading.Thread(target=client_of, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert wait_for(lambda: batcher.running == 0 and batcher.waiting == 0, timeout=60)

    def requests_alive() -> int:  # this server's (other tests' servers may still hold theirs)
        gc.collect()
        return sum(isinstance(o, _Run) and o.server.batcher is batcher for o in gc.get_objects())

    def series() -> set[str]:
        text = httpx.get(f"{url}/metrics").text
        return {line.split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}

    with serving(app) as url:
        soak(60)
        after_one = series()
        for _ in range(2):
            soak(60)
        assert series() == after_one
        assert wait_for(lambda: requests_alive() == 0)
        assert batcher.call(lambda: (len(batcher._held), len(batcher._handed_at))).result(30) == (0, 0)
        finished = batcher.call(lambda: [r.capacity for r, _ in batcher._rows.finished]).result(30)
        assert 0 < sum(finished) <= batcher._rows.finished_tokens


def test_eight_concurrent_streams_equal_sequential(served, api, tiny_engine):
    _, app = served
    questions = [
        f"{w} is" for w in ("Hello", "Tokyo", "Paris", "The capital", "A chat", "def add", "你好", "fine")
    ]
    expected = [
        engine_reply(tiny_engine, [{"role": "user", "content": q}], temperature=0, max_new_tokens=40)[0]
        for q in questions
    ]
    got: list = [None] * 8

    def stream(i: int) -> None:
        parts = api.chat.completions.create(
            messages=[{"role": "user", "content": questions[i]}], max_tokens=40, stream=True, **greedy()
        )
        got[i] = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)

    # The scheduler admits nobody until all eight wait: one by one (a busy machine), each could end before
    # the next came, and the batcher's peak of earlier tests in this module said "batched" all the same.
    batcher = app.state.batcher
    rows_per_step = collections.Counter(batcher.stats.batch_sizes)
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    release = hold_scheduler(batcher, start_s=10)
    try:
        for t in threads:
            t.start()
        assert wait_for(lambda: batcher.waiting == 8)
    finally:
        release.set()
    for t in threads:
        t.join(120)
    assert got == expected
    rows_per_step = batcher.stats.batch_sizes - rows_per_step  # this test's steps
    assert max(rows_per_step) == 8, rows_per_step  # all eight in one step


def test_metrics_and_request_log(served, api, caplog):
    url, _ = served
    with caplog.at_level(logging.INFO, logger="vicuna.server"):
        api.chat.completions.create(messages=HELLO, max_tokens=5, extra_body={"ignore_eos": True}, **greedy())
    line = [r.getMessage() for r in caplog.records if r.name == "vicuna.server"][-1]
    assert "prompt=" in line and "completion=5" in line and "ttft=" in line and "tok/s" in line
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "vicuna_requests_total",
        "vicuna_prompt_tokens_total",
        "vicuna_completion_tokens_total",
        "vicuna_time_to_first_token_seconds_count",
        "vicuna_inter_token_latency_seconds_count",
        "vicuna_queue_depth",
        "vicuna_running_batch_size",
    ):
        assert name in text
    assert metric(url, "vicuna_time_to_first_token_seconds_count") >= 1
    assert metric(url, 'vicuna_requests_total{endpoint="chat",status="200"}') >= 1


@contextlib.contextmanager
def serve_command(folder: str, log: Path, *flags: str) -> Iterator[tuple[str, Any]]:
    """`vicuna serve` of the model in `folder` with `flags`, in a subprocess on a free port, its output in
    `log`; yields its URL once /health answers, and the process."""
    import subprocess

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "vicuna", "serve", "--model-path", folder, "--dtype", "float32"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), *flags], stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/health").status_code == 200
            return False

        assert wait_for(up, 90)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_command_starts_the_server(tiny_engine, tmp_path):
    """`vicuna serve` end to end in a subprocess: flags, model loading, /health, a reply."""
    folder = tiny_engine.model.name_or_path
    flags = ("--no-webui", "--model-name", MODEL, "--api-keys", "sekrit")
    with serve_command(folder, tmp_path / "serve.log", *flags) as (url, proc):
        r = client(url, "sekrit").chat.completions.create(messages=HELLO, max_tokens=3, **greedy())
        assert r.usage.completion_tokens <= 3
        proc.terminate()  # SIGTERM (`docker stop`, `systemctl stop`): shut down as asked, a success
        assert proc.wait(30) == 0
    logged = (tmp_path / "serve.log").read_text()
    assert "prompt=" in logged  # the request's log line
    assert "Traceback" not in logged and "interrupted" not in logged
    # uvicorn's lines in the format of ours, with the time (they had none, and went to stdout); the /health
    # probes that found the server up are left out, as a load balancer's every few seconds would fill the log
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    request = rf'^{stamp} INFO uvicorn.access: 127\.0\.0\.1:\d+ - "POST /v1/chat/completions HTTP/1\.1" 200$'
    assert re.search(request, logged, re.MULTILINE), logged
    assert re.search(rf"^{stamp} INFO uvicorn.error: Application startup complete\.$", logged, re.MULTILINE)
    assert "/health" not in logged


def test_behind_a_proxy_at_a_path_the_web_ui_and_docs_link_under_it(tiny_engine, tmp_path):
    """nginx's `location /vicuna/ { proxy_pass http://127.0.0.1:8000/; }` passes /vicuna/X on as /X: the web
    UI's page then called /gradio_api/... and /docs fetched /openapi.json, outside /vicuna, where the proxy
    answers 404. The requests here are what such a proxy passes on."""
    folder = tiny_engine.model.name_or_path
    with serve_command(folder, tmp_path / "serve.log", "--root-path", "/vicuna/") as (url, _):
        assert "url: '/vicuna/openapi.json'" in httpx.get(f"{url}/docs").text
        assert httpx.get(f"{url}/openapi.json").status_code == 200
        proxied = {"Host": "example.com", "X-Forwarded-Proto": "https"}
        assert httpx.get(f"{url}/config", headers=proxied).json()["root"] == "https://example.com/vicuna"
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == Path(folder).name


@pytest.mark.parametrize("value", ["vicuna", "http://example.com/vicuna", "/a b"])
def test_a_root_path_that_is_not_a_url_path_is_refused_before_loading(value, capsys):
    from vicuna.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--root-path", value])
    assert (
        f"argument --root-path: {value!r} is not a URL path: /PREFIX as the proxy serves it"
        in capsys.readouterr().err
    )


def test_a_failed_probe_stays_in_the_access_log():
    """A load balancer's /health answered 503 (the server stopping) is worth a line; one answered 200 is not."""
    from vicuna.server import QuietProbes

    def kept(path: str, status: int) -> bool:
        args = ("10.0.0.2:5000", "GET", path, "1.1", status)
        record = logging.LogRecord(
            "uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', args, None
        )
        return QuietProbes("/vicuna").filter(record)

    assert not kept("/vicuna/health", 200) and not kept("/vicuna/metrics?x=1", 200)
    assert kept("/vicuna/health", 503) and kept("/vicuna/v1/models", 200) and kept("/vicuna/", 200)


def test_each_server_s_log_level_decides_whether_probes_are_logged():
    # a second server in one process (tests, notebooks) at --log-level debug kept the first one's filter
    from vicuna.server import QuietProbes, quiet_probes

    access = logging.getLogger("uvicorn.access")
    ours = lambda: [f for f in access.filters if isinstance(f, QuietProbes)]  # noqa: E731
    try:
        quiet_probes("/a", "info")
        quiet_probes("", "info")
        assert [f.root_path for f in ours()] == [""]
        quiet_probes("", "debug")
        assert ours() == []
    finally:
        for f in ours():
            access.removeFilter(f)


def test_the_printed_url_can_be_opened_for_any_host(monkeypatch):
    from vicuna.server import base_url

    monkeypatch.setattr(socket, "gethostname", lambda: "gpu-box")
    assert base_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert base_url("0.0.0.0", 8000) == "http://gpu-box:8000"  # every interface: the machine's name
    assert base_url("::", 8000) == "http://gpu-box:8000"
    assert base_url("::1", 8000) == "http://[::1]:8000"
    assert httpx.URL(base_url("fe80::1", 8000)).port == 8000


def test_serve_refuses_a_busy_port_a_bad_host_and_bad_flags_before_loading_the_model(tmp_path, capsys):
    from vicuna.cli import main

    never_loaded = str(tmp_path / "no-such-model")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert main(["serve", "--model-path", never_loaded, "--port", port]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    # a --host that is not this machine's was told that another server might run there: choose another --port
    assert main(["serve", "--model-path", never_loaded, "--host", "192.0.2.1"]) == 2  # TEST-NET-1: nobody's
    said = capsys.readouterr().err
    assert "192.0.2.1 is not an address of this machine; use one of its own, or 0.0.0.0" in said
    assert "--port" not in said
    assert main(["serve", "--model-path", never_loaded, "--host", "no-such-host.invalid"]) == 2
    said = capsys.readouterr().err
    assert said.startswith("error: cannot listen on no-such-host.invalid: no such address (")
    assert "--host takes an address or name of this machine (0.0.0.0: every interface)" in said
    for flag, value in (("--max-batch-size", "0"), ("--stream-interval", "-5"), ("--max-queue", "-1")):
        assert main(["serve", "--model-path", never_loaded, flag, value]) == 2
        assert f"error: {flag} must be" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [("--api-keys", ""), ("--api-keys", " , "), ()])
def test_serve_refuses_api_keys_that_hold_no_key(tmp_path, capsys, monkeypatch, flag):
    """`--api-keys "$KEY"` with $KEY unset, or an empty $VICUNA_API_KEYS, served everyone without a key."""
    from vicuna.cli import main

    monkeypatch.setenv("VICUNA_API_KEYS", "" if not flag else "k")
    assert main(["serve", "--model-path", str(tmp_path / "never-loaded"), *flag]) == 2
    assert "which holds no key; give at least one, or leave both out" in capsys.readouterr().err


def test_serve_on_windows_does_not_share_its_port(monkeypatch):
    # Windows' SO_REUSEADDR lets a socket bind a port that another is listening on, so a second `vicuna
    # serve --port 8000` would load its model and share the port instead of being refused at once
    from vicuna.server import listen

    options = []
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(socket.socket, "setsockopt", lambda self, *option: options.append(option))
    with listen("127.0.0.1", 0):
        pass
    assert (socket.SOL_SOCKET, socket.SO_REUSEADDR, 1) not in options


@pytest.mark.slow
def test_builtin_model_answers():
    from vicuna.config import ModelSettings
    from vicuna.engine.loader import load_engine

    engine = load_engine(ModelSettings(dtype="float32"), progress=False)
    with serving(create_app(engine)) as url:
        api = client(url)
        model = api.models.list().data[0].id
        r = api.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=30,
        )
        assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    # Vicuna's template ends on "ASSISTANT:", after which this byte-level tokenizer's reply begins " The":
    # a chat reply starts at its first visible character, streamed or not (a completion keeps the space)
    vicuna = load_engine(ModelSettings(dtype="float32", conv_template="vicuna_v1.1"), progress=False)
    with serving(create_app(vicuna)) as url:
        api = client(url)
        ask = {"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        whole = api.chat.completions.create(**ask, temperature=0, max_tokens=8).choices[0].message.content
        parts = api.chat.completions.create(**ask, temperature=0, max_tokens=8, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
        assert whole == streamed and whole and not whole[0].isspace()
        prompt = render(vicuna.template, [Message("user", "What is the capital of France?")])
        completion = api.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=8)
        assert completion.choices[0].text == " " + whole


def test_out_of_memory_is_a_503_to_retry_and_the_server_goes_on(tiny_engine, monkeypatch, gpu_out_of_memory):
    import torch

    from vicuna.engine import batching

    app = create_app(tiny_engine, model_name=MODEL, max_batch_size=2)
    real_step, failures, emptied = batching._LlamaRows.step, [], []

    def step(self, tokens):
        if failures:
            failures.pop()
            raise gpu_out_of_memory()
        return real_step(self, tokens)

    monkeypatch.setattr(batching._LlamaRows, "step", step)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU: its cache is given back
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    body = greedy(messages=HELLO, max_tokens=8)
    with serving(app) as url:
        failures.append(1)
        r = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert r.status_code == 503 and r.headers["retry-after"].isdigit()
        error = error_of(r)
        assert error["code"] == "out_of_memory" and "--max-batch-size" in error["message"]
        assert emptied
        failures.append(1)
        lines = raw_stream(url, {**body, "stream": True})
        streamed = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
        assert streamed[-1]["error"]["code"] == "out_of_memory"
        r = httpx.post(f"{url}/v1/chat/completions", json=body)  # the next request is served
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert metric(url, 'vicuna_requests_total{endpoint="chat",status="503"}') == 2


def test_out_of_memory_while_scoring_a_prompt_is_a_503_and_the_memory_is_given_back(tiny_engine, monkeypatch):
    # the whole prompt's logits over the vocabulary: the memory of a long prompt, given back as a reply's is
    import torch

    app = create_app(tiny_engine, model_name=MODEL)
    forward, emptied = tiny_engine.model.forward, []

    def out_of_memory(*args, **kwargs):
        if kwargs.get("use_cache") is False:  # the scoring forward
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_engine.model, "forward", out_of_memory)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU: its cache is given back
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    body = {"model": MODEL, "prompt": "Hello world", "echo": True, "logprobs": 1, "max_tokens": 0}
    with serving(app) as url:
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 503 and error_of(r)["code"] == "out_of_memory"
        assert emptied


def test_a_reply_cut_short_by_shutdown_says_so(tiny_engine):
    app = create_app(tiny_engine, model_name=MODEL)
    batcher = app.state.batcher
    step = batcher._rows.step
    batcher._rows.step = lambda tokens: (time.sleep(0.005), step(tokens))[1]
    body = greedy(messages=HELLO, max_tokens=900, extra_body={"ignore_eos": True})
    with serving(app) as url:
        streamed: list[str] = []

        def read() -> None:
            payload = {**body.pop("extra_body"), **body, "stream": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=payload, timeout=60) as r:
                streamed.extend(line for line in r.iter_lines() if line)

        reader = threading.Thread(target=read)
        reader.start()
        assert wait_for(lambda: len(streamed) > 5)
        batcher.stop()  # what Ctrl-C on `vicuna serve` does first
        reader.join(30)
        last = json.loads(streamed[-1].removeprefix("data: "))
        assert last["error"]["code"] == "shutting_down"  # not a [DONE] that reads as a whole reply
        r = httpx.get(f"{url}/health")  # a load balancer sends no more requests here
        assert r.status_code == 503 and r.json()["status"] == "shutting_down"
        # a request that arrives meanwhile (on a kept-alive connection) is told to come back, not that it is bad
        for path, new in (
            ("chat/completions", greedy(messages=HELLO, max_tokens=2)),
            ("completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "stream": True}),
            ("embeddings", {"model": MODEL, "input": "Hello"}),
        ):
            r = httpx.post(f"{url}/v1/{path}", json=new)
            assert r.status_code == 503 and r.headers["retry-after"].isdigit(), r.text
            assert error_of(r)["code"] == "shutting_down"


def test_a_web_ui_reply_cut_short_by_shutdown_says_so_and_gives_the_message_back(tiny_engine):
    """Ctrl-C on `vicuna serve` mid-reply: the page said "stopped", as if its user had pressed Stop."""
    app = create_app(tiny_engine, model_name=MODEL, webui=True)
    batcher = app.state.batcher
    step = batcher._rows.step
    batcher._rows.step = lambda tokens: (time.sleep(0.005), step(tokens))[1]
    with serving(app) as url:
        data = ["Hello", [], None, "", 0.0, 1.0, 200, ""]  # as `webui_chat` sends it
        event_id = httpx.post(f"{url}/gradio_api/call/chat", json={"data": data}).json()["event_id"]
        events: list[tuple[str, str]] = []
        with httpx.stream("GET", f"{url}/gradio_api/call/chat/{event_id}", timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("event: "):
                    events.append((line.removeprefix("event: "), next(lines).removeprefix("data: ")))
                    if len(events) == 5:  # the reply is streaming
                        batcher.stop()  # what Ctrl-C on `vicuna serve` does first
    (event, error), (_, put_back) = events[-1], events[-2]
    assert event == "error" and "the server is shutting down" in json.loads(error)["error"]
    assert json.loads(put_back)[1] == "Hello"  # the message, for the page to put back in the box


def test_json_answers_say_they_are_utf_8_and_keep_chinese_as_it_is(served):
    url, _ = served
    ask = greedy(messages=[{"role": "user", "content": "你好"}], max_tokens=4)
    answers = [
        httpx.post(f"{url}/v1/chat/completions", json=ask),
        httpx.post(f"{url}/v1/chat/completions", json={**ask, "model": "模型"}),  # an error
        httpx.get(f"{url}/v1/models"),
        httpx.get(f"{url}/health"),
    ]
    assert [r.headers["content-type"] for r in answers] == ["application/json; charset=utf-8"] * 4
    assert "'模型'".encode() in answers[1].content  # not \\u escapes


def test_a_body_not_in_utf_8_or_with_full_width_punctuation_is_a_400_saying_so(served):
    url, _ = served
    body = json.dumps(
        greedy(messages=[{"role": "user", "content": "你好"}], max_tokens=2), ensure_ascii=False
    )
    gbk = httpx.post(f"{url}/v1/chat/completions", content=body.encode("gbk"))
    at = body.encode("gbk").index("你".encode("gbk"))
    assert gbk.status_code == 400
    assert error_of(gbk)["message"] == (
        f"the request body is not UTF-8 (byte {at} is 0xc4): send the JSON encoded as UTF-8"
    )
    typed = httpx.post(f"{url}/v1/chat/completions", content=body.replace('"model":', '"model"：').encode())
    assert typed.status_code == 400
    assert error_of(typed)["message"].endswith("found the full-width '：' where JSON needs ':')")


def test_a_body_nested_too_deeply_is_a_400_not_a_crash(served, caplog):
    url, _ = served
    deep = "[" * 100_000 + "]" * 100_000  # 200 KB: far under the size limit
    for path in ("chat/completions", "completions", "embeddings"):
        with caplog.at_level(logging.ERROR):
            r = httpx.post(f"{url}/v1/{path}", content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "too deeply" in error_of(r)["message"], r.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback in the log


@pytest.mark.skipif(sys.platform == "win32", reason="no limit on open files to raise")
def test_the_server_raises_its_limit_on_open_files_for_many_connections():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard limit on open files is {hard}: nothing to raise")
    # vicuna serve started with the usual soft limit of 1024: a thousand idle connections refused everyone else
    script = (
        "import resource; from vicuna.server import open_files_raised; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
        "print(open_files_raised(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    expected = 65535 if hard == resource.RLIM_INFINITY else min(65535, hard)
    assert out.split() == [str(expected)] * 2


def test_the_server_starts_where_the_system_refuses_more_open_files(monkeypatch, caplog):
    import resource

    from vicuna.server import open_files_raised

    def refused(kind, limits):  # macOS: the hard limit says unlimited, the kernel caps it far lower
        raise ValueError("current limit exceeds maximum limit")

    monkeypatch.setattr(resource, "getrlimit", lambda kind: (256, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", refused)
    with caplog.at_level(logging.WARNING):
        assert open_files_raised() == 256  # was a traceback, and no server
    assert "cannot raise the limit on open files from 256 to 65535" in caplog.text


def test_a_number_of_thousands_of_digits_is_a_400_not_a_crash(served, caplog):
    url, _ = served
    # Python reads an integer of at most 4300 digits; a longer one was a 500, and the connection was dropped
    body = json.dumps(greedy(messages=HELLO, max_tokens=0)).replace(
        '"max_tokens": 0', '"max_tokens": ' + "9" * 5000
    )
    for path in ("chat/completions", "completions", "embeddings"):
        with caplog.at_level(logging.ERROR):
            r = httpx.post(f"{url}/v1/{path}", content=body, headers={"content-type": "application/json"})
        assert (
            r.status_code == 400
            and f"more than {sys.get_int_max_str_digits()} digits" in error_of(r)["message"]
        ), r.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback in the log


def test_an_unpaired_surrogate_in_a_string_is_a_400_naming_the_field(served):
    url, _ = served
    json_post = {"headers": {"content-type": "application/json"}}
    # a pair of surrogates (json.dumps escapes "😀" so) is one character; so is "\\ud800" typed as text
    emoji = json.dumps(greedy(messages=[{"role": "user", "content": "😀 \\ud800"}], max_tokens=2))
    assert "\\ud83d\\ude00" in emoji
    assert httpx.post(f"{url}/v1/chat/completions", content=emoji, **json_post).status_code == 200
    for path, body, param in [
        (
            "chat/completions",
            greedy(messages=[{"role": "user", "content": "hi \ud800"}]),
            "messages[0].content",
        ),
        ("completions", greedy(prompt=["ok", "\udfff"], max_tokens=2), "prompt[1]"),
        ("embeddings", {"model": MODEL, "input": "\ud800"}, "input"),
        ("chat/completions", greedy(messages=HELLO, **{"x\ud800": 1}), None),
    ]:
        r = httpx.post(f"{url}/v1/{path}", content=json.dumps(body), **json_post)
        assert r.status_code == 400 and error_of(r)["param"] == param, r.text
        assert "unpaired UTF-16 surrogate" in error_of(r)["message"]


def test_embeddings_stop_when_their_client_goes_away(tiny_engine, caplog):
    app = create_app(tiny_engine, model_name=MODEL)
    batcher = app.state.batcher
    computed: list[int] = []
    embed = batcher._embed
    batcher._embed = lambda lists: (computed.append(len(lists)), time.sleep(0.005), embed(lists))[2]
    with serving(app) as url, caplog.at_level(logging.INFO, logger="vicuna.server"):
        with pytest.raises(httpx.ReadTimeout):  # the client gives up, closing its connection
            httpx.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": ["Hello"] * 2000}, timeout=1)
        assert wait_for(lambda: metric(url, 'vicuna_requests_total{endpoint="embeddings",status="499"}') == 1)
        # its one log line, as every request has
        assert [r for r in caplog.records if r.getMessage().startswith("embeddings 499 inputs=2000 ")]
        done = len(computed)
        assert done < 2000
        r = httpx.post(f"{url}/v1/chat/completions", json=greedy(messages=HELLO, max_tokens=2), timeout=60)
        assert r.status_code == 200 and len(computed) == done


def test_serve_on_windows_says_what_to_do_about_a_port_windows_keeps(monkeypatch):
    """Hyper-V, WSL 2 and Docker have Windows keep ranges of ports from programs: binding one fails with
    WinError 10013 ("An attempt was made to access a socket in a way forbidden by its access permissions",
    in Chinese "以一种访问权限不允许的方式做了一个访问套接字的尝试"), with no program seen listening on it, and
    the error said nothing more."""
    from vicuna.server import listen

    def reserved(self, address):
        raise OSError(10013, "以一种访问权限不允许的方式做了一个访问套接字的尝试。", None, 10013)

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(socket.socket, "bind", reserved)
    with pytest.raises(VicunaError) as err:
        listen("0.0.0.0", 8000)
    assert str(err.value).startswith("cannot listen on 0.0.0.0:8000: 以一种访问权限不允许的方式")
    assert "`netsh interface ipv4 show excludedportrange protocol=tcp`" in str(err.value)
    assert str(err.value).endswith("choose another --port")


def test_scoring_stops_and_is_logged_499_when_its_client_goes_away(tiny_engine, caplog, monkeypatch):
    """A client that leaves while its prompts are being scored (echo with logprobs, as lm-eval sends them)
    stops the scoring between two prompts and is counted 499, with the one log line every request has."""
    app = create_app(tiny_engine, model_name=MODEL)
    scored: list[int] = []
    score = tiny_engine.score
    monkeypatch.setattr(
        tiny_engine, "score", lambda ids, top: (scored.append(len(ids)), time.sleep(0.05), score(ids, top))[2]
    )
    body = greedy(prompt=["Hello there"] * 60, max_tokens=0, echo=True, logprobs=0)
    with serving(app) as url, caplog.at_level(logging.INFO, logger="vicuna.server"):
        with pytest.raises(httpx.ReadTimeout):  # the client gives up, closing its connection
            httpx.post(f"{url}/v1/completions", json=body, timeout=1)
        assert wait_for(
            lambda: metric(url, 'vicuna_requests_total{endpoint="completions",status="499"}') == 1
        )
        lines = [r.getMessage() for r in caplog.records if " completions 499 " in r.getMessage()]
        assert len(lines) == 1 and lines[0].endswith(" finish=" + ",".join(["cancelled"] * 60)), lines
        done = len(scored)
        assert done < 60
        r = httpx.post(f"{url}/v1/chat/completions", json=greedy(messages=HELLO, max_tokens=2), timeout=60)
        assert r.status_code == 200 and len(scored) == done
