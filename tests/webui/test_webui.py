"""The web UI: its handlers on a real tiny engine, and the page in a real headless Chromium."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fastapi
import gradio as gr
import pytest
import uvicorn
from fastapi.testclient import TestClient

from vicuna import webui
from vicuna.config import ModelSettings, SamplingParams
from vicuna.conversation import Message
from vicuna.engine.events import Event, Finished, TextChunk
from vicuna.webui.page import WebChat, stats_line, to_chatbot

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)"
)


class RecordingChat:
    """`engine.chat` as the plain function the UI takes; records each call and how it ended.
    `pace_s` spaces the events out so that a test can press Stop while a reply is still streaming."""

    def __init__(self, engine, pace_s: float = 0.0) -> None:
        self.engine, self.pace_s = engine, pace_s
        self.calls: list[tuple[list[Message], SamplingParams]] = []
        self.finished: list[Finished] = []
        self.texts: list[str] = []

    def __call__(
        self, messages: list[Message], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[Event]:
        self.calls.append((messages, params))
        text = ""
        for event in self.engine.chat(messages, params, cancel=cancel):
            if isinstance(event, TextChunk):
                text += event.text
                time.sleep(self.pace_s)
            else:
                self.texts.append(text)
                self.finished.append(event)
            yield event


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    from vicuna.engine.loader import load_engine

    return load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype="float32"), progress=False)


@contextmanager
def serve(app: fastapi.FastAPI) -> Iterator[str]:
    """Run `app` with uvicorn on a free port of 127.0.0.1 in a thread; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def set_number(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


# --- without a browser ---------------------------------------------------------------------------


def test_stats_line_and_chatbot_messages():
    done = Finished("length", 10, 64, ttft_s=0.25, decode_tokens_per_s=31.25, total_s=2.3)
    assert stats_line(done) == "64 tokens · 31.2 tokens/s · first token 0.25 s · max tokens reached"
    assert stats_line(Finished("cancelled", 10, 3, 0.1, 5.0, 0.5)).endswith("· stopped")
    assert (
        stats_line(Finished("stop", 10, 3, 0.1, 5.0, 0.5)) == "3 tokens · 5.0 tokens/s · first token 0.10 s"
    )
    messages = to_chatbot([("hi", "```py\nprint(1)", "2 tokens"), ("and?", "so", "")])
    assert messages[0] == {"role": "user", "content": "hi"}
    # a reply cut off inside a code block is closed for display; the stats are a part under the reply
    assert messages[1]["content"] == ["```py\nprint(1)\n```", '<span class="vicuna-stats">2 tokens</span>']
    assert messages[2:] == [{"role": "user", "content": "and?"}, {"role": "assistant", "content": "so"}]
    assert to_chatbot([("waiting", "", "")]) == [{"role": "user", "content": "waiting"}]


def test_handlers_stream_stop_regenerate_and_refuse_a_bad_key(engine):
    chat = RecordingChat(engine)
    ui = WebChat(chat, api_keys={"k-secret"})
    request = gr.Request(session_hash="s1")
    with pytest.raises(gr.Error, match="API key"):
        next(ui.respond("hi", [], "", 0.0, 1.0, 5, "wrong", request))
    with pytest.raises(gr.Error, match="API key"):
        next(ui.regenerate([("hi", "x", "")], "", 0.0, 1.0, 5, "", request))
    assert chat.calls == []

    outputs = list(ui.respond("Hello", [], "Be brief.", 0.0, 0.5, 6, "k-secret", request))
    box, shown, turns = outputs[-1]
    assert box == ""
    assert turns == [("Hello", chat.texts[0], stats_line(chat.finished[0]))]
    assert shown == to_chatbot(turns)
    messages, params = chat.calls[0]
    assert messages == [Message("system", "Be brief."), Message("user", "Hello")]
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.0, 0.5, 6)
    assert len(outputs) > 2  # the reply streamed in pieces before the stats arrived

    again = list(ui.regenerate(turns, "", 0.0, 1.0, 6, "k-secret", request))
    assert chat.calls[1][0] == [Message("user", "Hello")]  # an empty system box: the template's own
    assert again[-1][1] == [("Hello", chat.texts[1], stats_line(chat.finished[1]))]

    streaming = ui.respond("Tell me more", turns, "", 0.0, 1.0, 100, "k-secret", request)
    next(streaming)
    next(streaming)  # generation has begun
    ui.stop(request)
    rest = list(streaming)
    assert chat.finished[2].reason == "cancelled"
    assert chat.finished[2].completion_tokens < 100
    assert rest[-1][2][-1][2].endswith("stopped")
    assert ui.running == {}


def test_context_overflow_is_reported_and_the_message_kept(engine):
    ui = WebChat(RecordingChat(engine), api_keys=None)
    steps = ui.respond("Hello", [], "", 0.7, 1.0, 5000, "", gr.Request(session_hash="s2"))
    assert next(steps)[0] == ""
    assert next(steps) == ("Hello", [], [])  # back as it was: the text returns to the textbox
    with pytest.raises(gr.Error, match="context window is 256 tokens"):
        next(steps)


def test_mount_keeps_the_apps_own_routes():
    app = fastapi.FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    returned = webui.mount(app, chat=lambda *_: iter(()), model_name="tiny-model")
    assert returned is app
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/").status_code == 200
        assert client.get("/config").json()["title"] == "tiny-model · vicuna"


# --- in Chromium ---------------------------------------------------------------------------------


@pytest.mark.browser
@needs_chromium
def test_browser_chat_streams_stops_regenerates_and_clears(engine, browser):
    chat = RecordingChat(engine, pace_s=0.05)
    app = webui.mount(fastapi.FastAPI(), chat=chat, model_name="tiny-model", default_system="Be brief.")
    with serve(app) as url:
        page = browser.new_page()
        page.goto(url)
        message = page.locator("#message textarea")
        message.wait_for(state="visible")
        assert page.locator("#system textarea").input_value() == "Be brief."
        set_number(page, "temperature", 0)
        set_number(page, "max-tokens", 200)  # longer than the test waits: Stop ends it
        message.fill("Write a long story.")
        message.press("Enter")

        # the answer appears while it is still being generated, then Stop cancels the generation
        page.wait_for_function(
            "() => document.querySelector('#chatbot .bot-row')?.innerText.trim().length > 0"
        )
        assert chat.finished == []
        page.locator("#stop").click()
        page.locator(".vicuna-stats").wait_for()
        assert chat.finished[0].reason == "cancelled"
        assert chat.finished[0].completion_tokens < 200
        messages, params = chat.calls[0]
        assert messages == [Message("system", "Be brief."), Message("user", "Write a long story.")]
        assert (params.temperature, params.top_p, params.max_new_tokens) == (0.0, 1.0, 200)
        stats = page.locator(".vicuna-stats").inner_text()
        assert stats == stats_line(chat.finished[0])
        assert "tokens/s" in stats and stats.endswith("stopped")
        # the reply as rendered: markdown may drop punctuation, never letters or digits
        reply = page.locator("#chatbot .bot-row").first.inner_text().removesuffix(stats).strip()
        assert re.sub(r"\W", "", reply) == re.sub(r"\W", "", chat.texts[0])

        set_number(page, "max-tokens", 4)
        page.locator("#regenerate").click()
        page.wait_for_function(
            "() => document.querySelector('.vicuna-stats')?.innerText.includes('max tokens')"
        )
        assert chat.calls[1][0] == messages
        assert page.locator("#chatbot .user-row").count() == 1

        page.locator("#clear").click()
        page.wait_for_function("() => document.querySelectorAll('#chatbot .user-row').length === 0")
        question = "Explain:\n```python\nprint(1)\n```"
        message.fill(question)
        message.press("Enter")
        page.wait_for_function("() => document.querySelectorAll('.vicuna-stats').length === 1")
        assert chat.calls[2][0] == [Message("system", "Be brief."), Message("user", question)]
        assert page.locator("#chatbot .user-row pre code").inner_text().strip() == "print(1)"
        page.close()


@pytest.mark.browser
@needs_chromium
def test_browser_asks_for_the_api_key_first(engine, browser):
    chat = RecordingChat(engine)
    app = webui.mount(fastapi.FastAPI(), chat=chat, model_name="tiny-model", api_keys={"k-one", "k-two"})
    with serve(app) as url:
        page = browser.new_page()
        page.goto(url)
        key = page.locator("#api-key input")
        key.wait_for(state="visible")
        assert not page.locator("#message textarea").is_visible()
        key.fill("k-wrong")
        key.press("Enter")
        page.get_by_text("Invalid API key").wait_for()
        assert not page.locator("#message textarea").is_visible()

        key.fill("k-two")
        page.locator("#api-key-enter").click()
        message = page.locator("#message textarea")
        message.wait_for(state="visible")
        assert not key.is_visible()
        set_number(page, "max-tokens", 4)
        message.fill("Hello")
        message.press("Enter")
        page.locator(".vicuna-stats").wait_for()
        assert len(chat.calls) == 1 and chat.finished[0].completion_tokens <= 4
        page.close()


def test_out_of_memory_is_reported_and_the_message_kept(engine):
    import torch

    def chat(messages, params, cancel):
        yield TextChunk("Hel", (1,))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    ui = WebChat(chat, api_keys=None)
    steps = ui.respond("Hello", [], "", 0.7, 1.0, 64, "", gr.Request(session_hash="s3"))
    while next(steps) != ("Hello", [], []):  # until the page is put back as it was
        pass
    with pytest.raises(gr.Error, match="ran out of memory"):
        next(steps)
