"""Requests the protocol accepts or refuses, end to end through the app (tiny model, template vicuna_v1.1)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from vicuna.server.app import create_app

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def http(tiny_engine):
    with TestClient(create_app(tiny_engine, model_name="tiny", max_batch_size=2)) as client:
        yield client


def post(http, **fields):
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 2, "temperature": 0} | fields
    return http.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Hello"}, {"role": "user", "content": "again"}],
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi"},
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "How are you?"},
        ],
    ],
)
def test_valid_openai_conversations_are_answered(http, tiny_engine, messages):
    assert tiny_engine.template.name == "vicuna_v1.1"
    r = post(http, messages=messages)
    assert r.status_code == 200, r.text


def test_harmless_record_fields_are_accepted(http):
    r = post(http, store=False, metadata={"k": "v"}, service_tier="auto", user="u")
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"max_tokens": "5"}, "max_tokens"),
        ({"n": True}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"stop": ["a", 1]}, "stop"),
        ({"seed": 36893488147419103232}, "seed"),
        ({"store": True}, "store"),
        ({"tools": []}, "tools"),
    ],
)
def test_bad_fields_are_a_400_that_names_them(http, fields, param):
    r = post(http, **fields)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_conversation_our_template_cannot_render_is_a_400_that_names_the_message(http):
    r = post(http, messages=[{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0]"
    assert r.json()["error"]["message"].startswith("messages[0]: expected a user message")


def test_top_p_0_is_the_greedy_reply(http):
    """OpenAI takes top_p in [0, 1]: 0 keeps the smallest nucleus, the one most likely token (it was a 400)."""
    greedy = post(http, max_tokens=8)
    r = post(http, max_tokens=8, temperature=1.0, top_p=0, seed=3)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]


def test_a_wrong_route_is_told_with_the_routes_there_are(http):
    """The SDK's `client.responses.create` (or a base_url without /v1) was answered a bare "Not Found", as an
    unknown model's is, and a GET of a POST route "Method Not Allowed": now they say what was called."""
    r = http.post("/v1/responses", json={"model": "tiny", "input": "Hello"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    message = r.json()["error"]["message"]
    assert message.startswith("POST /v1/responses: no such route") and "POST /v1/chat/completions" in message
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert (
        r.json()["error"]["message"] == "GET /v1/chat/completions: method not allowed; this path takes POST"
    )


def test_a_tool_call_in_the_history_is_a_400_naming_it(http):
    """An assistant message's tool call was dropped silently: the model read the turn as its text alone."""
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    history = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
        {"role": "user", "content": "Well?"},
    ]
    r = post(http, messages=history)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].tool_calls", r.text
    assert "tool calling is not supported" in r.json()["error"]["message"]
    history[1] |= {"tool_calls": [], "function_call": None}  # as some clients send with every message
    assert post(http, messages=history).status_code == 200


def test_logit_bias_forces_and_bans_tokens(http, tiny_engine):
    """OpenAI's logit_bias (it was a 400): +100 makes a token all but certain, -100 all but impossible."""
    from vicuna.config import SamplingParams

    prompt = tiny_engine.encode("Hello")

    def generated(**settings) -> tuple[list[int], str]:
        params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True, **settings)
        events = list(tiny_engine.generate(prompt, params))
        ids = [i for e in events for i in getattr(e, "token_ids", ())]
        return ids, "".join(getattr(e, "text", "") for e in events)

    greedy, text = generated()
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}

    def reply(**fields) -> str:
        r = http.post("/v1/completions", json=body | fields)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert reply() == text
    forced = greedy[0] + 1
    ids, text = generated(logit_bias=[(forced, 100)])
    assert ids == [forced] * 4 and reply(logit_bias={str(forced): 100}) == text
    assert reply(temperature=1.0, seed=5, logit_bias={str(forced): 100}) == text
    ids, text = generated(logit_bias=[(i, -100) for i in greedy])
    assert not set(ids) & set(greedy) and reply(logit_bias={str(i): -100 for i in greedy}) == text
    vocab = tiny_engine.model.config.vocab_size
    r = post(http, logit_bias={str(vocab): 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
    assert f"token id {vocab} is not in the model's vocabulary" in r.json()["error"]["message"]
