"""Bodies that popular chat front-ends send by default, trimmed from their request builders: served, not
refused for a field the server could honour (each test names the front-end and the setting)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from vicuna import protocol as p
from vicuna.server.app import create_app

MODEL = "tiny"
MESSAGES = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def http(tiny_engine):
    with TestClient(create_app(tiny_engine, model_name=MODEL)) as client:
        yield client


def test_min_p_is_a_sampler_setting():
    """Open WebUI's advanced parameter min_p, and SillyTavern's (text completion, vLLM type; 0 by default)."""
    req = p.parse_request(p.ChatCompletionRequest, {"model": "m", "messages": MESSAGES, "min_p": 0.05})
    assert req.sampling_params(max_new_tokens=4).min_p == 0.05
    assert p.parse_request(p.CompletionRequest, {"model": "m", "prompt": "a", "min_p": 0}).min_p == 0
    bad = pytest.raises(
        p.InvalidRequest,
        p.parse_request,
        p.ChatCompletionRequest,
        {"model": "m", "messages": MESSAGES, "min_p": 1.5},
    )
    assert bad.value.param == "min_p"


def test_open_webui_chat_with_min_p_is_served(http):
    body = {"model": MODEL, "messages": MESSAGES, "stream": False, "min_p": 0.05, "max_tokens": 4, "seed": 1}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


# SillyTavern, Text Completion, API type vLLM, default settings: getTextGenGenerationData's fields that its
# server keeps for vLLM (VLLM_KEYS), as they are before any setting is changed
SILLYTAVERN_VLLM = {
    "prompt": "User: Hi\nAssistant:",
    "model": MODEL,
    "max_tokens": 4,
    "temperature": 0.7,
    "top_p": 0.5,
    "min_p": 0,
    "repetition_penalty": 1.2,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "top_k": 40,
    "min_tokens": 0,
    "stop": ["\nUser:"],
    "skip_special_tokens": True,
    "n": 1,
    "best_of": 1,
    "ignore_eos": False,
    "spaces_between_special_tokens": True,
    "stream": False,
}


def test_sillytavern_vllm_text_completion_is_served(http):
    r = http.post("/v1/completions", json=SILLYTAVERN_VLLM)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("field", ["skip_special_tokens", "spaces_between_special_tokens"])
def test_special_token_text_kept_in_a_reply_is_refused_naming_the_field(http, field):
    """False asks for special tokens' text in the reply, which the engine never writes: refused, not ignored."""
    r = http.post("/v1/completions", json={**SILLYTAVERN_VLLM, field: False})
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert "send true or leave it out" in r.json()["error"]["message"]


def test_sillytavern_generic_text_completion_without_a_model_gets_the_served_one(http):
    """SillyTavern's Generic (OpenAI-compatible) text completion leaves `model` out until its user types a
    model ID (its field is marked optional), and keeps only OpenAI's fields of its settings."""
    body = {
        "prompt": "User: Hi\nAssistant:",
        "max_tokens": 4,
        "temperature": 0.7,
        "top_p": 0.5,
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "stop": ["\nUser:"],
        "stream": False,
    }
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == MODEL
    r = http.post("/v1/completions", json={**body, "model": "gpt-4"})  # a model named is still checked
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = http.post("/v1/embeddings", json={"input": "Hi"})  # the same for embeddings, as vLLM takes it
    assert r.status_code == 200 and r.json()["model"] == MODEL


def test_a_base_url_ending_in_a_slash_is_told_to_drop_it(http):
    """Chatbox and SillyTavern's custom chat completion append "/chat/completions" to the base URL as typed:
    "http://host:8000/v1/" called /v1//chat/completions, a 404 that only listed the routes."""
    r = http.post("/v1//chat/completions", json={"model": MODEL, "messages": MESSAGES})
    assert r.status_code == 404
    assert "take the '/' off the end of the base URL" in r.json()["error"]["message"]
    r = http.post("/v1/responses", json={"model": MODEL, "input": "Hi"})
    assert r.status_code == 404 and "base URL" not in r.json()["error"]["message"]


def test_a_public_site_allowed_by_origin_may_call_a_server_on_a_private_network(tiny_engine):
    """Chrome's preflight from a hosted front-end (NextChat's web app, Chatbox web) to a server on localhost
    or the LAN asks for private network access too: it was a 400 ("Disallowed CORS private-network") even
    for an origin named in --allowed-origins, so the page could not call the server at all."""
    page, other = "https://app.nextchat.dev", "https://elsewhere.example"
    asks = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
        "Access-Control-Request-Private-Network": "true",
    }
    with TestClient(create_app(tiny_engine, model_name=MODEL, allowed_origins=[page])) as client:
        r = client.options("/v1/chat/completions", headers={"Origin": page, **asks})
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-private-network"] == "true"
        assert r.headers["access-control-allow-origin"] == page
        r = client.options("/v1/chat/completions", headers={"Origin": other, **asks})  # still refused
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    # "*" grants no site access to a private network: each front-end is named for that
    with TestClient(create_app(tiny_engine, model_name=MODEL, allowed_origins=["*"])) as client:
        r = client.options("/v1/chat/completions", headers={"Origin": page, **asks})
        assert r.status_code == 400 and "access-control-allow-private-network" not in r.headers
        del asks["Access-Control-Request-Private-Network"]  # a server on a public address: served
        r = client.options("/v1/chat/completions", headers={"Origin": page, **asks})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("reasoning_effort", "medium", "turn reasoning effort off"),  # Open WebUI's Reasoning Effort
        ("num_ctx", 4096, "remove num_ctx"),  # Open WebUI's Ollama context length, set on an OpenAI model
        ("repeat_penalty", 1.1, "send repetition_penalty"),  # llama.cpp's and Ollama's name
        ("typical_p", 0.9, "reset or remove that setting"),  # SillyTavern's samplers: not implemented
        ("top_a", 0.1, "reset or remove that setting"),
    ],
)
def test_a_front_end_setting_that_would_change_the_reply_is_refused_saying_what_to_do(
    http, field, value, says
):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert says in r.json()["error"]["message"]
