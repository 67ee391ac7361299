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
