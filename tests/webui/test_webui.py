"""The web UI: its handlers on a real tiny engine, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import fastapi
import gradio as gr
import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from starlette.routing import Mount

from vicuna import webui
from vicuna.config import ModelSettings, SamplingParams
from vicuna.conversation import Message
from vicuna.engine.events import Event, Finished, TextChunk
from vicuna.errors import ServerBusyError, ShuttingDownError, VicunaError
from vicuna.webui import page
from vicuna.webui.page import WebChat, sampling_params, stats_line, to_chatbot
from vicuna.webui.texts import language

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
        events = self.engine.chat(messages, params, cancel=cancel)  # a prompt too long raises here
        self.calls.append((messages, params))
        return self._record(events)

    def _record(self, events: Iterator[Event]) -> Iterator[Event]:
        text = ""
        for event in events:
            if isinstance(event, TextChunk):
                text += event.text
                time.sleep(self.pace_s)
            else:
                self.texts.append(text)
                self.finished.append(event)
            yield event


def page_app(engine, chat, **kwargs) -> fastapi.FastAPI:
    """The page mounted for `chat` on the tiny engine, as `vicuna serve` mounts it for its model."""
    return webui.mount(
        fastapi.FastAPI(),
        chat=chat,
        encode=engine.encode_chat,
        context_window=engine.context_window,
        model_name="tiny-model",
        **kwargs,
    )


def no_encode(messages: list[Message]) -> list[int]:
    """A prompt's length where the chat is a stand-in without a tokenizer: a token a message."""
    return [0] * len(messages)


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


DONE = Finished("stop", 3, 1, 0.1, 0.0, 0.1)


def replying(reply: str) -> fastapi.FastAPI:
    """The web UI over a chat that answers every message with `reply`, then DONE."""

    def chat(messages, params, cancel):
        yield TextChunk(reply, (1,))
        yield DONE

    return webui.mount(fastapi.FastAPI(), chat=chat, encode=no_encode, context_window=2048, model_name="m")


def test_the_page_sends_gradio_no_analytics_and_asks_for_no_version(monkeypatch):
    """Gradio's default (without GRADIO_ANALYTICS_ENABLED=False) posts each page built to its analytics
    server and asks PyPI for its latest version: a server run to keep chats on the machine calls out."""
    import gradio.analytics

    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    called = []
    for name in ("initiated_analytics", "version_check"):
        monkeypatch.setattr(gradio.analytics, name, lambda *a, name=name: called.append(name))
    with TestClient(replying("Hi")) as client:
        assert client.get("/").status_code == 200
    assert called == []


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


BOT_TEXT = "(document.querySelector('#chatbot .bot-row')?.innerText.trim() ?? '')"


def wait_for_status(page, text: str) -> None:
    """Until the line under the chat reads `text` (a reply's stats)."""
    page.wait_for_function("t => document.querySelector('#reply-status')?.innerText.trim() === t", arg=text)


def wait_until(done, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- without a browser ---------------------------------------------------------------------------


def test_stats_line_and_chatbot_messages():
    done = Finished("length", 10, 64, ttft_s=0.25, decode_tokens_per_s=31.25, total_s=2.3)
    assert stats_line(done) == "64 tokens · 31.2 tokens/s · first token 0.25 s · max tokens reached"
    assert stats_line(done, cut=True).endswith("· context window full")
    assert stats_line(Finished("cancelled", 10, 3, 0.1, 5.0, 0.5)).endswith("· stopped")
    # stopped while it waited for a row, or during its prompt: no first token to time (it said 1.57 s)
    assert stats_line(Finished("cancelled", 7000, 0, 1.57, 0.0, 1.57)) == "0 tokens · stopped"
    assert (
        stats_line(Finished("stop", 10, 3, 0.1, 5.0, 0.5)) == "3 tokens · 5.0 tokens/s · first token 0.10 s"
    )
    messages = to_chatbot([("hi", "```py\nprint(1)", "2 tokens"), ("and?", "so", "")])
    assert messages[0] == {"role": "user", "content": "hi"}
    # a reply cut off inside a code block is closed for display; the stats are not part of the message
    # (its copy button copies the message's content)
    assert messages[1] == {"role": "assistant", "content": "```py\nprint(1)\n```"}
    assert messages[2:] == [{"role": "user", "content": "and?"}, {"role": "assistant", "content": "so"}]
    assert to_chatbot([("waiting", "", "")]) == [{"role": "user", "content": "waiting"}]


def test_settings_outside_the_sliders_are_refused():
    params = sampling_params(0.0, 0.5, 3.5, max_tokens_limit=256)
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.0, 0.5, 4)
    for bad in [(5, 1, 10), (-1, 1, 10), (0.7, 0, 10), (0.7, 1, 0), (0.7, 1, 257), (0.7, 1, None)]:
        with pytest.raises(VicunaError, match="must be a number from"):
            sampling_params(*bad, max_tokens_limit=256)
    with pytest.raises(VicunaError, match="Temperature must be a number from 0 to 2 .it is nan"):
        sampling_params(float("nan"), 1, 10, max_tokens_limit=256)

    chat = RecordingChat(None)
    ui = WebChat(chat, no_encode, 256)
    with pytest.raises(gr.Error, match="Top-p must be a number from 0.01 to 1") as refused:
        next(ui.respond("Hello", [], None, "", 0.7, 0.0, 10, "", gr.Request(session_hash="s0")))
    assert chat.calls == [] and not refused.value.print_exception  # nothing sent, no traceback


def test_the_settings_the_browser_kept_are_restored_where_the_sliders_take_them():
    ui = WebChat(RecordingChat(None), no_encode, 256)
    kept = ui.keep_settings("Answer in French.", 0.2, 0.9, 100)
    assert [update["value"] for update in ui.restore_settings(kept)] == ["Answer in French.", 0.2, 0.9, 100]
    # a server restarted with a model of a smaller context window: max new tokens lowered to it
    assert ui.restore_settings({**kept, "max_tokens": 4096})[3]["value"] == 256
    # nothing kept yet, or values no slider takes: the page's own (and never a traceback: Infinity, which
    # Python's JSON reader takes, raised OverflowError from round() as the page loaded)
    for stored in [None, [], {"system": 3, "temperature": 5, "top_p": "x", "max_tokens": float("nan")}]:
        assert ui.restore_settings(stored) == (gr.skip(),) * 4
    for max_tokens in [float("inf"), -float("inf"), -5, 0, "100", True, None]:
        assert ui.restore_settings({"max_tokens": max_tokens}) == (gr.skip(),) * 4


def test_an_edited_message_is_found_among_the_turns_and_answered_again_without_what_came_after():
    turns = [("one", "1", "s"), ("two", "", "s"), ("three", "3", "s")]  # "two" got an empty reply: no row
    assert [page.turn_of(turns, index) for index in range(6)] == [0, None, 1, 2, None, None]

    calls: list[list[Message]] = []
    done = Finished("stop", 5, 1, 0.1, 10.0, 0.1)

    def chat(messages, params, cancel):
        calls.append(messages)
        yield TextChunk("2", (1,))
        yield done

    ui = WebChat(chat, no_encode, 256)
    edited = gr.EditData(None, {"index": 2, "value": "TWO", "previous_value": "two"})
    request = gr.Request(session_hash="s-edit")
    *_, last = ui.edit(turns, None, "", 0.0, 1.0, 10, "", edited, request)
    assert calls == [[Message("user", "one"), Message("assistant", "1"), Message("user", "TWO")]]
    assert last[2] == [("one", "1", "s"), ("TWO", "2", stats_line(done))]  # "three" and its reply gone
    # a reply's row (not editable, but the page may say so), or an edit to nothing: nothing sent
    for index, value in [(1, "x"), (2, "  ")]:
        edit = gr.EditData(None, {"index": index, "value": value, "previous_value": "two"})
        assert next(ui.edit(turns, None, "", 0.0, 1.0, 10, "", edit, request))[0] == to_chatbot(turns)
    assert len(calls) == 1


def test_undo_drops_the_last_exchange_but_not_while_a_reply_is_written():
    ui = WebChat(RecordingChat(None), no_encode, 256)
    turns = [("one", "1", "s1"), ("two", "2", "s2")]
    request = gr.Request(session_hash="s-undo")
    assert ui.undo(turns, request) == (to_chatbot(turns[:1]), "s1", turns[:1], "two")
    ui.running["s-undo"] = threading.Event()  # a reply is being written: Stop it first
    assert ui.undo(turns, request) == (gr.skip(),) * 4
    assert ui.undo([], gr.Request(session_hash="s-none")) == (gr.skip(),) * 4


def test_handlers_stream_stop_regenerate_and_refuse_a_bad_key(engine):
    chat = RecordingChat(engine)
    ui = WebChat(chat, engine.encode_chat, engine.context_window, api_keys={"k-secret"})
    request = gr.Request(session_hash="s1")
    with pytest.raises(gr.Error, match="API key"):
        next(ui.respond("hi", [], None, "", 0.0, 1.0, 5, "wrong", request))
    with pytest.raises(gr.Error, match="API key"):
        next(ui.regenerate([("hi", "x", "")], None, "", 0.0, 1.0, 5, "", request))
    assert chat.calls == []
    # a key box's text sent as JSON may hold a lone surrogate: refused as any wrong key (it was an exception)
    assert ui.login("k-\ud800", request)[3] == "**Invalid API key.** Try again."
    # so may a message or the system prompt: the tokenizer failed on it (a bare "Error", a traceback)
    for text, system in [("hi \ud800", ""), ("hi", "Be \udfff brief.")]:
        replies = ui.respond(text, [], None, system, 0.0, 1.0, 5, "k-secret", request)
        with pytest.raises(gr.Error, match="lone UTF-16 surrogate") as refused:
            list(replies)
        assert not refused.value.print_exception
    assert chat.calls == []

    outputs = list(ui.respond("Hello", [], None, "Be brief.", 0.0, 0.5, 6, "k-secret", request))
    # the textbox is cleared once, when the message is taken, and then never touched: the user may be
    # typing the next message; Send and Regenerate are disabled until the reply is done
    assert [out[0] for out in outputs] == ["", *[gr.skip()] * (len(outputs) - 1)]
    assert outputs[0][6:] == (gr.update(interactive=False),) * 2
    box, unsent, shown, status, turns, left_out, send, again = outputs[-1]
    assert unsent == gr.skip()  # nothing failed: nothing to put back
    assert turns == [("Hello", chat.texts[0], stats_line(chat.finished[0]))]
    assert (shown, status) == (to_chatbot(turns), stats_line(chat.finished[0]))
    assert send == again == gr.update(interactive=True)
    messages, params = chat.calls[0]
    assert messages == [Message("system", "Be brief."), Message("user", "Hello")]
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.0, 0.5, 6)
    assert len(outputs) > 2  # the reply streamed in pieces before the stats arrived

    again = list(ui.regenerate(turns, left_out, "", 0.0, 1.0, 6, "k-secret", request))
    assert chat.calls[1][0] == [Message("user", "Hello")]  # an empty system box: the template's own
    assert again[-1][2] == [("Hello", chat.texts[1], stats_line(chat.finished[1]))]
    assert ui.show(again[-1][2], request) == again[-1][:2]  # as a reload shows the conversation kept
    # a reload while a reply was written ended it: the line under the chat says so, not nothing
    cut = [*again[-1][2], ("Go on", "Once up", "")]
    shown, status = ui.show(cut, request)
    assert shown == to_chatbot(cut) and status.startswith("The last reply was cut short")
    assert ui.show([], request) == ([], "")

    streaming = ui.respond("Tell me more", turns, left_out, "", 0.0, 1.0, 100, "k-secret", request)
    next(streaming)
    next(streaming)  # generation has begun
    ui.stop(request)
    rest = list(streaming)
    assert chat.finished[2].reason == "cancelled"
    assert chat.finished[2].completion_tokens < 100
    assert rest[-1][3].endswith("stopped")
    assert ui.running == {}


def test_a_reply_is_cut_to_the_context_window_and_an_overflow_reported(engine, caplog):
    chat = RecordingChat(engine)
    ui = WebChat(chat, engine.encode_chat, engine.context_window)
    *_, last = ui.respond("Hello", [], None, "", 0.0, 1.0, 256, "", gr.Request(session_hash="s2"))
    # max new tokens is lowered to what the 256-token window leaves after the prompt
    assert chat.calls[0][1].max_new_tokens == 256 - chat.finished[0].prompt_tokens
    assert chat.finished[0].reason == "length" and last[3].endswith("context window full")

    long = "Hello there " * 200
    steps = ui.respond(long, [], None, "", 0.7, 1.0, 16, "", gr.Request(session_hash="s2"))
    assert next(steps)[0] == ""
    # back as it was, and the buttons enabled again; the message is handed back for the page to put in
    # the box, before any draft there (the server does not know what the user typed there meanwhile)
    ready = gr.update(interactive=True)
    assert next(steps) == (gr.skip(), long, [], "", [], gr.skip(), ready, ready)
    refused = pytest.raises(gr.Error, match="context window is 256 tokens: shorten it")
    with caplog.at_level(logging.INFO, logger="vicuna.webui"), refused as err:
        next(steps)
    # a user's error is one line in the log, not a traceback
    assert not err.value.print_exception
    assert [r.getMessage() for r in caplog.records] == [f"refused: {err.value.message}"]


def test_a_system_prompt_too_long_for_the_context_window_is_named_in_the_refusal(engine):
    """The refusal said "The message has N tokens in the prompt" for a short message after a long system
    prompt, whose tokens N counted."""
    ui = WebChat(RecordingChat(engine), engine.encode_chat, engine.context_window)
    system = "Be brief. " * 200
    zh = gr.Request(session_hash="z3", headers={"accept-language": "zh-CN"})
    for request, said in [
        (
            gr.Request(session_hash="s3"),
            r"The message and the system prompt make a prompt of \d+ tokens, but ",
        ),
        (
            zh,
            r"这条消息和系统提示词构成的提示有 \d+ 个 token，但模型的上下文窗口只有 256 个 token：请缩短其中之一。",
        ),
    ]:
        with pytest.raises(gr.Error, match=said):
            list(ui.respond("Hi", [], None, system, 0.7, 1.0, 16, "", request))


def test_a_conversation_grown_past_the_context_window_leaves_out_its_oldest_exchanges(engine):
    chat = RecordingChat(engine)
    ui = WebChat(chat, engine.encode_chat, engine.context_window)
    turns = [("Hello there " * 40, "General Kenobi", "2 tokens"), ("And then?", "Nothing", "1 tokens")]
    *_, last = ui.respond("Why?", turns, None, "Be brief.", 0.0, 1.0, 64, "", gr.Request(session_hash="s4"))
    # the system prompt stays; the oldest exchange goes, so the reply keeps its 64 tokens
    messages, params = chat.calls[-1]
    assert [m.content for m in messages] == ["Be brief.", "And then?", "Nothing", "Why?"]
    assert params.max_new_tokens == 64
    status, kept = last[3], last[4]
    assert status.endswith("the oldest 1 exchange(s) left out to fit the context window")
    assert [t[0] for t in kept] == ["Hello there " * 40, "And then?", "Why?"]  # the page shows them all


def test_a_long_conversation_is_encoded_a_few_times_and_the_next_turns_reuse_its_cache(
    engine, monkeypatch, prefill_starts
):
    """Leaving out one exchange per try, the page encoded the whole conversation once per exchange left
    out; and leaving out one more on every turn, each prompt began differently and was computed whole."""
    encoded = []
    encode = engine.encode_chat
    monkeypatch.setattr(engine, "encode_chat", lambda messages: encoded.append(1) or encode(messages))
    chat = RecordingChat(engine)
    ui = WebChat(chat, engine.encode_chat, engine.context_window)
    request = gr.Request(session_hash="s5")
    turns = [(f"Question {i}?", f"Answer {i}.", "") for i in range(60)]
    *_, last = ui.respond("Why?", turns, None, "Be brief.", 0.0, 1.0, 8, "", request)
    left_out = last[5][0]
    assert left_out > 40 and last[3].endswith(
        f"the oldest {left_out} exchange(s) left out to fit the context window"
    )
    assert len(encoded) <= 2 * math.ceil(math.log2(len(turns))) + 2  # two bisections, and the prompt sent
    for i in range(2):  # the next turns leave out the same exchanges: their prompts begin as the last one
        *_, last = ui.respond(f"And {i}?", last[4], last[5], "Be brief.", 0.0, 1.0, 8, "", request)
        assert last[5][0] == left_out
        assert chat.calls[-1][0][0] == Message("system", "Be brief.")
        # the last prompt comes from the cache (its reply too, where the tiny model's random text encodes
        # back to the same tokens)
        assert prefill_starts[-1] >= chat.finished[-2].prompt_tokens


def test_the_page_keeps_the_exchanges_a_browser_session_left_out_for_its_next_messages(engine):
    chat = RecordingChat(engine)
    app = page_app(engine, chat)
    turns = [[f"Question {i}?", f"Answer {i}.", ""] for i in range(40)]
    with TestClient(app) as client:
        for i in range(3):  # as the page sends them: the session's State (None here) is the server's
            data = [f"And {i}?", turns, None, "Be brief.", 0.0, 1.0, 8, ""]
            sent = client.post("/gradio_api/call/chat", json={"data": data, "session_hash": "s6"})
            answer = client.get(f"/gradio_api/call/chat/{sent.json()['event_id']}").text
            turns = json.loads(re.findall(r"^data: (.*)$", answer, re.M)[-1])[4]
    # the prompts: the system prompt, the exchanges kept and the message (40 exchanges before the first)
    left_out = [40 + k - (len(messages) - 2) // 2 for k, (messages, _) in enumerate(chat.calls)]
    assert left_out[0] > 0 and left_out == [left_out[0]] * 3, left_out


def test_the_exchanges_a_session_left_out_stay_out_while_its_conversation_begins_with_them():
    turns = [(f"q{i}", f"a{i}", "") for i in range(6)]
    state = page.left_out_of(turns[:4], 2)
    assert page.still_left_out([*turns, ("next", "", "")], state) == 2  # a message sent
    assert page.still_left_out([*turns[:3], ("q3", "", "")], state) == 2  # Regenerate
    assert page.still_left_out([("q9", "", "")], state) == 0  # Clear, and a new message
    assert page.still_left_out([("q0", "other", ""), *turns[1:]], state) == 0  # another conversation
    assert page.still_left_out(turns, None) == 0  # a new session: after a reload, or a server restart


def words_until_cancelled(messages, params, cancel):
    """A stand-in chat: a word a piece, until `cancel` is set, as the engine ends a reply."""
    for i in range(1000):
        if cancel.is_set():
            yield Finished("cancelled", 5, i, 0.1, 10.0, 0.3)
            return
        yield TextChunk(f" word{i}", (i,))
    yield Finished("length", 5, 1000, 0.1, 10.0, 0.3)


def test_clear_during_a_reply_leaves_the_page_cleared():
    """Clear stopped the reply being written, which went on to send its next pieces and its stats: the
    page showed the conversation again (one Clear in three, in Chromium, as the answers crossed)."""
    ui = WebChat(words_until_cancelled, no_encode, 2048)
    request = gr.Request(session_hash="s7")
    streaming = ui.respond("Write a long story.", [], None, "", 0.7, 1.0, 1000, "", request)
    next(streaming)
    next(streaming)  # the reply has begun
    assert ui.clear(request)[:3] == ([], "", [])
    # nothing more shows the conversation: the reply's last answer shows the page cleared, as Clear's
    [last] = list(streaming)
    assert last[2:6] == ([], "", [], None)

    # a newer reply of the same session (sent meanwhile) owns the page: the older one sends nothing more
    older = ui.respond("Hello", [], None, "", 0.7, 1.0, 1000, "", request)
    next(older)
    next(older)
    newer = ui.respond("Hi", [], None, "", 0.7, 1.0, 5, "", request)
    next(newer)
    assert list(older) == []
    assert [user for user, _, _ in list(newer)[-1][4]] == ["Hi"]


def test_a_streaming_reply_stores_the_conversation_in_the_browser_now_and_then(monkeypatch):
    """Each piece of a reply stored the whole conversation in the browser (encrypted, in localStorage):
    with a 100 KB conversation kept, the page took twice as long to show a reply."""
    turns = [(f"Question {i}?", "An answer. " * 100, "") for i in range(100)]
    request = gr.Request(session_hash="s8")

    def stored(interval_s: float) -> list[bool]:  # whether each answer stores the conversation
        monkeypatch.setattr(page, "STORE_EVERY_S", interval_s, raising=False)
        ui = WebChat(words_until_cancelled, no_encode, 2048)
        outputs = ui.respond("And?", turns, None, "", 0.7, 1.0, 1000, "", request)
        return [out[4] != gr.skip() for out in outputs]

    every_piece = stored(0.0)
    assert len(every_piece) == 1002 and all(every_piece)
    # the message as it is sent, and the reply when it ends: a reload shows both
    assert stored(math.inf) == [True, *[False] * 1000, True]


def test_a_reply_starts_at_its_first_visible_character():
    def chat(messages, params, cancel):  # a reply after "ASSISTANT:" begins with the space of its first word
        yield from [TextChunk(" ", (1,)), TextChunk(" Hello", (2,)), TextChunk(" there ", (3,))]
        yield Finished("stop", 5, 3, 0.1, 10.0, 0.3)

    ui = WebChat(chat, no_encode, 2048)
    *_, last = ui.respond("Hi", [], None, "", 0.7, 1.0, 64, "", gr.Request(session_hash="s9"))
    turns = last[4]
    assert [(user, reply) for user, reply, _ in turns] == [("Hi", "Hello there ")]


def test_out_of_memory_is_reported_and_the_message_kept(caplog, gpu_out_of_memory):

    def chat(messages, params, cancel):
        yield TextChunk("Hel", (1,))
        raise gpu_out_of_memory()

    ui = WebChat(chat, no_encode, 2048)
    steps = ui.respond("Hello", [], None, "", 0.7, 1.0, 64, "", gr.Request(session_hash="s3"))
    while next(steps)[:5] != (gr.skip(), "Hello", [], "", []):  # until the page is put back as it was
        pass
    with pytest.raises(gr.Error, match="ran out of memory") as err:
        next(steps)
    assert not err.value.print_exception
    assert [r.getMessage() for r in caplog.records] == ["the GPU ran out of memory for a reply"]


def test_a_failed_message_goes_back_into_the_box_before_a_draft_there():
    """The page's put-back (`PUT_BACK`, run in the browser after a message failed) kept a draft typed
    while the reply was written and dropped the failed message: the user lost one of the two."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("needs Node.js to run the page's JavaScript")
    cases = [
        ("Tell me a story.", "my draft\n"),  # both kept, the failed message first
        ("Tell me a story.", ""),
        ("Tell me a story.", " \n"),
        ("", "Hello"),  # refused before it was taken (a bad API key): the box still holds it
    ]
    script = f"const putBack = {page.PUT_BACK};\nconsole.log(JSON.stringify({json.dumps(cases)}.map(c => putBack(...c))))"
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [
        ["Tell me a story.\n\nmy draft\n", ""],
        ["Tell me a story.", ""],
        ["Tell me a story.", ""],
        ["Hello", ""],
    ]


def test_the_page_speaks_the_language_the_browser_prefers_of_english_and_simplified_chinese():
    for header, lang in [
        ("zh-CN,zh;q=0.9,en;q=0.8", "zh"),
        ("en-US,en;q=0.9,zh;q=0.5", "en"),
        (None, "en"),
        ("", "en"),
        ("zh", "zh"),
        ("zh-Hans", "zh"),
        ("zh-Hans-TW", "zh"),
        ("fr-FR,fr;q=0.9,zh-CN;q=0.8,en;q=0.7", "zh"),  # the first of the two the page has
        ("en;q=0.5,zh-CN;q=0.8", "zh"),  # by weight, not by place
        ("zh-CN;q=0,en", "en"),  # q=0: not acceptable
        ("zh-TW,zh-Hant;q=0.9,en;q=0.8", "en"),  # Traditional Chinese is not what the page has
        ("zh-TW,zh;q=0.9,en;q=0.8", "zh"),
        ("de-DE", "en"),
        ("zh-CN;q=oops,en", "en"),
    ]:
        assert language(header) == lang, header

    # the handlers' words, in the language of the request
    zh = gr.Request(session_hash="z1", headers={"accept-language": "zh-CN,zh;q=0.9,en;q=0.8"})
    ui = WebChat(RecordingChat(None), no_encode, 256, api_keys={"k"})
    with pytest.raises(gr.Error, match="需要有效的 API 密钥"):
        next(ui.respond("你好", [], None, "", 0.7, 1.0, 10, "wrong", zh))
    assert ui.login("wrong", zh)[3] == "**API 密钥无效。** 请重试。"
    assert ui.show([("你好", "你", "")], zh)[1].startswith("上一条回复未写完")
    with pytest.raises(gr.Error, match="温度必须是 0 到 2 之间的数（当前为 5）。"):
        next(ui.respond("你好", [], None, "", 5, 1.0, 10, "k", zh))
    for error, said in [
        (ServerBusyError(), "服务器正忙于生成其他回复：请稍后重试。"),
        (ShuttingDownError(), "服务器正在关闭：请在它重新启动后重试。"),
    ]:

        def refusing(messages, params, cancel, error=error):
            raise error

        with pytest.raises(gr.Error, match=said):
            list(WebChat(refusing, no_encode, 256).respond("你好", [], None, "", 0.7, 1.0, 10, "", zh))
    done = Finished("length", 10, 64, ttft_s=0.25, decode_tokens_per_s=31.25, total_s=2.3)
    assert stats_line(done, cut=True, dropped=2, lang="zh") == (
        "64 个 token · 31.2 token/秒 · 首个 token 0.25 秒 · 上下文窗口已满 · 为放入上下文窗口，省略了最早的 2 轮对话"
    )


def test_mount_keeps_the_apps_own_routes_and_refuses_uploads():
    app = fastapi.FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    returned = webui.mount(
        app, chat=lambda *_: iter(()), encode=no_encode, context_window=2048, model_name="tiny-model"
    )
    assert returned is app
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/").status_code == 200
        assert client.get("/config").json()["title"] == "tiny-model · vicuna"
        # the page has no file inputs: Gradio's upload routes store nothing (they take no API key)
        for route in ("upload", "process_recording"):
            answer = client.post(f"/gradio_api/{route}", files={"files": ("big.bin", b"x" * 100_000)})
            assert (answer.status_code, answer.text) == (403, "this server takes no file uploads")


def test_a_body_larger_than_the_page_takes_is_a_413_before_it_is_read():
    chat = RecordingChat(None)
    app = webui.mount(
        fastapi.FastAPI(), chat=chat, encode=no_encode, context_window=64, model_name="tiny-model"
    )
    # Gradio read any body whole, without an API key: 300 MB sent to its queue grew the server by 900 MB.
    # 1 MB is far over what a 64-token window takes (64 KB)
    big = json.dumps(
        {"data": ["x" * 1_000_000, [], None, "", 0.7, 1.0, 16, ""], "fn_index": 0, "session_hash": "s"}
    )
    with TestClient(app) as client:
        for path in ("/gradio_api/queue/join", "/gradio_api/call/chat", "/gradio_api/run/chat"):
            declared = client.post(path, content=big, headers={"content-type": "application/json"})
            assert declared.status_code == 413, (path, declared.text)
            chunked = client.post(
                path, content=iter([big.encode()]), headers={"content-type": "application/json"}
            )
            assert chunked.status_code == 413, (path, chunked.text)
        small = {"data": ["", [], None, "", 0.7, 1.0, 16, ""]}  # a body that fits goes through
        assert client.post("/gradio_api/call/chat", json=small).status_code == 200
    assert not chat.calls


def test_the_server_keeps_the_state_of_the_latest_sessions_only(monkeypatch):
    def sessions(app: fastapi.FastAPI):  # Gradio's state of each browser session, the oldest used first
        [gradio_app] = [route.app for route in app.routes if isinstance(route, Mount)]
        return gradio_app.state_holder

    def mounted() -> fastapi.FastAPI:
        return webui.mount(
            fastapi.FastAPI(),
            chat=lambda *_: iter(()),
            encode=no_encode,
            context_window=2048,
            model_name="tiny-model",
        )

    # Gradio's default, 10,000 sessions, let one-turn chats grow the server by some 70 KB each
    app = mounted()
    assert sessions(app).capacity == page.SESSION_CAPACITY <= 1000

    monkeypatch.setattr(page, "SESSION_CAPACITY", 2)
    app = mounted()
    with TestClient(app) as client:
        for session in ("s1", "s2", "s3"):
            # an empty message: nothing to generate. The States (the exchanges left out, the key) have their
            # places in the data too; the session's own values are used
            data = ["", [], None, "", 0.7, 1.0, 16, ""]
            sent = client.post("/gradio_api/call/chat", json={"data": data, "session_hash": session})
            assert "event: complete" in client.get(f"/gradio_api/call/chat/{sent.json()['event_id']}").text
    assert list(sessions(app).session_data) == ["s2", "s3"]


def chat_waiting_for_a_row(waiting: list[threading.Event]) -> Callable[..., Iterator[Event]]:
    """A chat whose replies wait for a batch row that never comes, until cancelled; each reply's cancel
    event goes into `waiting`."""

    def chat(messages: list[Message], params: SamplingParams, cancel: threading.Event) -> Iterator[Event]:
        waiting.append(cancel)

        def events() -> Iterator[Event]:
            cancel.wait()
            yield Finished("cancelled", 1, 0, 0.0, 0.0, 0.0)

        return events()

    return chat


def test_every_chat_the_server_admits_runs_and_stop_answers_past_gradio_s_40_threads():
    """Each chat holds one of Gradio's threads while it waits for a batch row: with 40 waiting (a script's
    request holding every row), a 41st chat never reached the server, and Stop waited for one to end."""
    waiting: list[threading.Event] = []
    chat = chat_waiting_for_a_row(waiting)
    chats = webui.GRADIO_THREADS + 5
    app = webui.mount(
        fastapi.FastAPI(), chat=chat, encode=no_encode, context_window=64, model_name="m", max_chats=chats
    )
    with serve(app) as url:
        config = httpx.get(f"{url}config").json()
        [stop] = [i for i, d in enumerate(config["dependencies"]) if d["api_name"] == "stop"]
        try:
            for n in range(chats):  # chats from as many browser sessions
                data = ["Hello", [], None, "", 0.7, 1.0, 16, ""]
                sent = httpx.post(f"{url}gradio_api/call/chat", json={"data": data, "session_hash": f"s{n}"})
                assert sent.status_code == 200
            deadline = time.monotonic() + 60
            while len(waiting) < chats and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(waiting) == chats  # each reached the server (which may refuse it as busy)
            # the first session's user presses Stop: answered, and that chat ends
            pressed = {"fn_index": stop, "data": [], "session_hash": "s0", "trigger_id": None}
            assert httpx.post(f"{url}gradio_api/run/predict", json=pressed, timeout=30).status_code == 200
            assert sum(cancel.is_set() for cancel in waiting) == 1
        finally:
            for cancel in waiting:
                cancel.set()


def test_a_chat_waiting_for_a_row_ends_when_its_page_is_closed():
    """Gradio closes a reply's generator when its next piece comes: a chat still waiting for a batch row when its
    page was closed or reloaded waited on in the queue, and computed its prompt for nobody once given a row."""
    waiting: list[threading.Event] = []
    chat = chat_waiting_for_a_row(waiting)
    app = webui.mount(fastapi.FastAPI(), chat=chat, encode=no_encode, context_window=64, model_name="m")
    with serve(app) as url, httpx.Client(timeout=30) as page:
        try:
            # the page holds its heartbeat open while it is shown: Gradio's sign of a closed tab is its end
            with page.stream("GET", f"{url}gradio_api/heartbeat/s0") as heartbeat:
                alive = heartbeat.iter_lines()  # kept: the iterator closes the stream when dropped
                next(alive)
                data = ["Hello", [], None, "", 0.7, 1.0, 16, ""]
                page.post(f"{url}gradio_api/call/chat", json={"data": data, "session_hash": "s0"})
                deadline = time.monotonic() + 30
                while not waiting and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert len(waiting) == 1 and not waiting[0].is_set()
            # the tab is closed
            deadline = time.monotonic() + 30
            while not waiting[0].is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert waiting[0].is_set()
        finally:
            for cancel in waiting:
                cancel.set()


# --- in Chromium ---------------------------------------------------------------------------------


@pytest.mark.browser
@needs_chromium
def test_browser_chat_streams_stops_regenerates_clears_and_keeps_the_chat(engine, browser):
    chat = RecordingChat(engine, pace_s=0.05)
    app = page_app(engine, chat)
    with serve(app) as url:
        context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
        page = context.new_page()
        page.goto(url)
        message = page.get_by_role("textbox", name="Message")  # its name for screen readers
        message.wait_for(state="visible")
        assert page.locator("#system textarea").input_value() == ""  # the template's own
        page.locator("#system textarea").fill("Be brief.")
        assert page.locator("#max-tokens input[type=number]").get_attribute("max") == "256"  # the window
        set_number(page, "temperature", 0)
        set_number(page, "max-tokens", 200)  # longer than the test waits: Stop ends it
        message.fill("Write a long story.")
        message.press("Enter")

        # the answer appears while it is still being generated
        page.wait_for_function(f"() => {BOT_TEXT}.length > 0")
        assert chat.finished == []
        # the next message, typed and sent meanwhile, waits in the box while the reply streams on
        message.press_sequentially("And then?")
        message.press("Enter")
        assert page.locator("#send").is_disabled()
        shown = len(page.evaluate(f"() => {BOT_TEXT}"))
        page.wait_for_function(f"() => {BOT_TEXT}.length > {shown}")
        assert message.input_value() == "And then?"
        assert page.locator("#reply-status").inner_text().startswith("Writing the reply")

        # Stop cancels the generation; the stats are shown under the chat
        page.locator("#stop").click()
        wait_until(lambda: chat.finished)
        wait_for_status(page, stats_line(chat.finished[0]))
        assert chat.finished[0].reason == "cancelled"
        assert chat.finished[0].completion_tokens < 200
        assert page.locator("#reply-status").inner_text().endswith("stopped")
        messages, params = chat.calls[0]
        assert messages == [Message("system", "Be brief."), Message("user", "Write a long story.")]
        assert (params.temperature, params.top_p, params.max_new_tokens) == (0.0, 1.0, 200)
        # the reply as rendered: markdown may drop punctuation, never letters or digits
        reply = page.locator("#chatbot .bot-row").first.inner_text()
        assert re.sub(r"\W", "", reply) == re.sub(r"\W", "", chat.texts[0])
        # and as copied: its text alone
        page.locator("#chatbot .message-buttons-left button[aria-label='Copy message']").click()
        assert page.evaluate("navigator.clipboard.readText()") == chat.texts[0]

        # the message that waited is sent with Enter once the reply is done
        assert message.input_value() == "And then?" and page.locator("#send").is_enabled()
        set_number(page, "max-tokens", 4)
        message.press("Enter")
        wait_until(lambda: len(chat.finished) == 2)
        wait_for_status(page, stats_line(chat.finished[1]))
        assert chat.calls[1][0][1:] == [
            *messages[1:],
            Message("assistant", chat.texts[0]),
            Message("user", "And then?"),
        ]
        assert message.input_value() == ""

        page.locator("#regenerate").click()
        wait_until(lambda: len(chat.finished) == 3)
        wait_for_status(page, stats_line(chat.finished[2]))
        assert chat.calls[2][0] == chat.calls[1][0]
        assert page.locator("#chatbot .user-row").count() == 2

        page.locator("#clear").click()
        page.wait_for_function("() => document.querySelectorAll('#chatbot .user-row').length === 0")
        question = "Explain:\n```python\nprint(1)\n```"
        message.fill(question)
        message.press("Enter")
        wait_until(lambda: len(chat.finished) == 4)
        wait_for_status(page, stats_line(chat.finished[3]))
        assert chat.calls[3][0] == [Message("system", "Be brief."), Message("user", question)]
        assert page.locator("#chatbot .user-row pre code").inner_text().strip() == "print(1)"

        # the conversation is kept in the browser: a reload shows it again (the tiny model's reply may be
        # empty, when all it wrote was no character, and then has no row before the reload either)
        replies = page.locator("#chatbot .bot-row").count()
        assert replies == (1 if chat.texts[3] else 0)
        page.reload()
        wait_for_status(page, stats_line(chat.finished[3]))
        assert page.locator("#chatbot .user-row pre code").inner_text().strip() == "print(1)"
        assert page.locator("#chatbot .bot-row").count() == replies
        context.close()


@pytest.mark.browser
@needs_chromium
def test_browser_puts_a_failed_message_back_into_the_box_before_a_draft(browser):
    import torch

    fail = threading.Event()

    def chat(messages, params, cancel):
        if messages[-1].content == "Hi":
            yield TextChunk("Hello!", (1,))
            yield Finished("stop", 1, 1, 0.1, 10.0, 0.1)
            return
        yield TextChunk("Once upon", (1, 2))
        fail.wait(30)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    app = webui.mount(
        fastapi.FastAPI(), chat=chat, encode=no_encode, context_window=2048, model_name="tiny-model"
    )
    last_reply = "(Array.from(document.querySelectorAll('#chatbot .bot-row')).pop()?.innerText.trim() ?? '')"
    # whether what `selector` names is what the user sees at its middle, not something drawn over it
    in_sight = """selector => {
        const element = document.querySelector(selector), box = element.getBoundingClientRect();
        return element.contains(document.elementFromPoint(box.x + box.width / 2, box.y + box.height / 2));
    }"""
    with serve(app) as url:
        page = browser.new_page()
        page.goto(url)
        message = page.get_by_role("textbox", name="Message")
        message.wait_for(state="visible")
        toasts = page.get_by_text("ran out of memory")
        message.fill("Hi")
        message.press("Enter")
        page.wait_for_function(f"() => {last_reply} === 'Hello!'")

        # a draft typed while the reply was written stays, after the failed message
        message.fill("Tell me a story.")
        message.press("Enter")
        page.wait_for_function(f"() => {last_reply} === 'Once upon'")
        message.press_sequentially("my draft")
        fail.set()
        toasts.first.wait_for()
        page.wait_for_function("() => document.querySelectorAll('#chatbot .user-row').length === 1")
        assert page.locator("#send").is_enabled()
        page.wait_for_function(
            "() => document.querySelector('#message textarea').value === 'Tell me a story.\\n\\nmy draft'"
        )
        # the conversation and the box stay in sight: Gradio's "Error" badge covered both until closed
        assert page.evaluate(in_sight, "#chatbot .bot-row .message")  # on the left, clear of the toast
        assert page.evaluate(in_sight, "#message textarea")

        # with the box left empty, the failed message comes back to it, to be sent again
        fail.clear()
        message.fill("Tell me another.")
        message.press("Enter")
        page.wait_for_function(f"() => {last_reply} === 'Once upon'")
        assert message.input_value() == ""
        fail.set()
        page.wait_for_function(
            "() => document.querySelector('#message textarea').value === 'Tell me another.'"
        )
        assert page.locator("#chatbot .user-row").count() == 1
        page.close()


@pytest.mark.browser
@needs_chromium
def test_browser_asks_for_the_api_key_first(engine, browser, monkeypatch):
    # one session's state kept: another page's session pushes this one's key out
    monkeypatch.setattr("vicuna.webui.page.SESSION_CAPACITY", 1)
    chat = RecordingChat(engine)
    app = page_app(engine, chat, api_keys={"k-one", "k-two"})
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
        # read out by a screen reader: the focus stays in the key's box, and nothing else would say it
        assert (
            page.get_by_text("Invalid API key").evaluate("e => e.closest('[aria-live]')?.ariaLive")
            == "polite"
        )

        key.fill("k-two")
        page.locator("#api-key-enter").click()
        message = page.locator("#message textarea")
        message.wait_for(state="visible")
        assert not key.is_visible()
        set_number(page, "max-tokens", 4)
        message.fill("Hello")
        message.press("Enter")
        wait_until(lambda: chat.finished)
        wait_for_status(page, stats_line(chat.finished[0]))
        assert len(chat.calls) == 1 and chat.finished[0].completion_tokens <= 4

        # The server forgets the key entered when it restarts, or when newer sessions push this one's state
        # out: the key box comes back, where the error says to enter the key, and the message is kept
        other = browser.new_page()
        other.goto(url)
        other.locator("#api-key input").wait_for(state="visible")  # its session is the one kept
        other.close()
        message.fill("Hello again")
        message.press("Enter")
        page.get_by_text("A valid API key is needed").wait_for()
        key.wait_for(state="visible")
        page.locator("#api-key-enter").click()
        page.wait_for_function("() => document.querySelector('#message textarea').value === 'Hello again'")
        message.press("Enter")
        wait_until(lambda: len(chat.finished) == 2)
        assert chat.calls[1][0][-1] == Message("user", "Hello again")
        page.close()


@pytest.mark.browser
@needs_chromium
def test_browser_loads_no_image_a_reply_or_a_message_points_elsewhere(browser):
    import http.server

    fetched: list[str] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):  # another site, recording what is asked of it
        def do_GET(self) -> None:
            fetched.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    elsewhere = http.server.HTTPServer(("127.0.0.1", 0), Elsewhere)
    threading.Thread(target=elsewhere.serve_forever, daemon=True).start()
    there = f"http://127.0.0.1:{elsewhere.server_port}"
    # what text that steers the model has it write: the conversation carried out in an image's URL
    reply = (
        f"Done ![x]({there}/markdown?said=secret) <img src='{there}/img'> "
        f"<div style='background: url({there}/css)'>a</div> <video src='{there}/video' autoplay></video>"
    )
    try:
        with serve(replying(reply)) as url:
            page = browser.new_page()
            page.goto(url)
            message = page.locator("#message textarea")
            message.fill(f"Summarize ![y]({there}/pasted)")
            message.press("Enter")
            wait_for_status(page, stats_line(DONE))
            assert page.locator("#chatbot .bot-row img").count() == 2  # shown as Gradio shows them, but empty
            page.close()
    finally:
        elsewhere.shutdown()
    assert fetched == []


@pytest.mark.browser
@needs_chromium
def test_browser_page_is_in_chinese_where_the_browser_prefers_it(engine, browser):
    chat = RecordingChat(engine)
    app = page_app(engine, chat)
    with serve(app) as url:
        for locale, lang, send, system, placeholder in [
            ("zh-CN", "zh", "发送", "系统提示词", "输入消息，按 Enter 发送"),
            ("zh-Hans", "zh", "发送", "系统提示词", "输入消息，按 Enter 发送"),  # Gradio's own I18n: English
            ("en-US", "en", "Send", "System prompt", "Type a message and press Enter"),
        ]:
            context = browser.new_context(locale=locale)
            page = context.new_page()
            page.goto(url)
            page.wait_for_function("t => document.querySelector('#send')?.innerText.trim() === t", arg=send)
            assert page.locator("#regenerate").inner_text().strip() == (
                "重新生成" if lang == "zh" else "Regenerate"
            )
            assert page.locator("#system").get_by_text(system).is_visible()
            message = page.locator("#message textarea")
            assert message.get_attribute("placeholder") == placeholder
            set_number(page, "max-tokens", 4)
            sent = len(chat.finished) + 1
            message.fill("Hello")
            message.press("Enter")
            wait_until(lambda: len(chat.finished) == sent)  # noqa: B023 (called in this iteration)
            # the stats line, built on the server, in the same language
            wait_for_status(page, stats_line(chat.finished[-1], lang=lang))
            context.close()


@pytest.mark.browser
@needs_chromium
def test_browser_page_s_lang_attribute_is_the_language_of_its_words(browser):
    """A screen reader reads a page in the voice of its `lang` attribute, which Gradio set to the browser's
    own language: a French browser's English page said "fr", and Chinese words under an English browser "en"."""
    with serve(replying("Hi")) as url:
        for locale, accept_language, send, lang in [
            ("fr-FR", None, "Send", "en"),
            ("zh-TW", None, "Send", "en"),  # Traditional Chinese: the page is in English
            ("en-US", "zh-CN,zh;q=0.9", "发送", "zh-CN"),
            ("zh-CN", None, "发送", "zh-CN"),
        ]:
            headers = {"Accept-Language": accept_language} if accept_language else {}
            context = browser.new_context(locale=locale, extra_http_headers=headers)
            page = context.new_page()
            page.goto(url)
            page.wait_for_function("t => document.querySelector('#send')?.innerText.trim() === t", arg=send)
            page.wait_for_function("lang => document.documentElement.lang === lang", arg=lang)
            context.close()


@pytest.mark.browser
@needs_chromium
def test_browser_chat_says_to_screen_readers_who_wrote_each_message(browser):
    """The chat's messages were told apart by where they are drawn alone: a screen reader read the message
    and the reply one after the other, without a word of whose each was."""
    with serve(replying("Hello **there**.")) as url:
        for locale, you, assistant in [("en-US", '"You:"', '"Assistant:"'), ("zh-CN", "你：", "助手：")]:
            context = browser.new_context(locale=locale)
            page = context.new_page()
            page.goto(url)
            message = page.locator("#message textarea")
            message.fill("Hi")
            message.press("Enter")
            wait_for_status(page, stats_line(DONE, lang=locale[:2]))
            heard = page.locator("#chatbot [role=log]").aria_snapshot()
            assert f"- text: {you}\n  - paragraph: Hi\n" in heard
            assert f"- text: {assistant}\n  - paragraph:\n    - text: Hello\n    - strong: there\n" in heard
            assert page.locator("#chatbot .bot-row").inner_text().strip() == "Hello there."  # nothing to see
            context.close()


@pytest.mark.browser
@needs_chromium
def test_browser_renders_a_reply_s_maths_in_latex_s_delimiters_and_leaves_code_and_prices_alone(browser):
    # LaTeX's \(...\) and \[...\], as models write them, were shown as markdown made them: "(x^2 + y^2)"
    reply = (
        "Inline \\(x^2 + y^2\\), display \\[ \\int_0^1 x\\,dx \\] and $$E = mc^2$$.\n\n"
        "It costs $5, or $10 with tax. The regex `\\(\\d+\\)`:\n\n```\n\\[a\\]\n```"
    )
    with serve(replying(reply)) as url:
        page = browser.new_page()
        page.goto(url)
        message = page.locator("#message textarea")
        message.fill("Some maths, please")
        message.press("Enter")
        wait_for_status(page, stats_line(DONE))
        shown = page.locator("#chatbot .bot-row")
        shown.locator(".katex").first.wait_for(state="attached")  # KaTeX loads when a reply first needs it
        formulas = shown.locator(".katex annotation").evaluate_all("all => all.map((a) => a.textContent)")
        formulas = [formula.strip() for formula in formulas]
        assert formulas == ["x^2 + y^2", "\\int_0^1 x\\,dx", "E = mc^2"]
        assert shown.locator(".katex-display").count() == 2  # \[...\] and $$...$$ on lines of their own
        assert "It costs $5, or $10 with tax." in shown.inner_text()
        assert shown.locator("p code").inner_text() == "\\(\\d+\\)"
        assert shown.locator("pre code").inner_text().strip() == "\\[a\\]"
        page.close()


@pytest.mark.browser
@needs_chromium
def test_browser_keeps_the_system_prompt_and_the_settings_with_the_conversation(browser):
    # a reload kept the conversation but not its system prompt: the next message went without it
    calls: list[tuple[list[Message], SamplingParams]] = []

    def chat(messages, params, cancel):
        calls.append((messages, params))
        yield TextChunk("Bonjour", (1,))
        yield DONE

    app = webui.mount(fastapi.FastAPI(), chat=chat, encode=no_encode, context_window=2048, model_name="m")
    with serve(app) as url:
        page = browser.new_page()
        page.goto(url)
        page.locator("#system textarea").fill("Answer in French.")
        set_number(page, "temperature", 0.2)
        set_number(page, "max-tokens", 100)
        message = page.locator("#message textarea")
        message.fill("Hello")
        message.press("Enter")
        wait_for_status(page, stats_line(DONE))
        page.reload()
        wait_for_status(page, stats_line(DONE))  # the conversation is back
        page.wait_for_function(
            "() => document.querySelector('#system textarea').value === 'Answer in French.'"
        )
        assert page.locator("#temperature input[type=number]").input_value() == "0.2"
        assert page.locator("#max-tokens input[type=number]").input_value() == "100"
        message.fill("And now?")
        message.press("Enter")
        wait_until(lambda: len(calls) == 2)
        messages, params = calls[1]
        assert messages[0] == Message("system", "Answer in French.")
        assert (params.temperature, params.max_new_tokens) == (0.2, 100)
        page.close()


@pytest.mark.browser
@needs_chromium
def test_browser_escape_stops_the_reply_being_written(browser):
    ended: list[Finished] = []

    def chat(messages, params, cancel):
        for i in range(600):
            if cancel.is_set():
                break
            yield TextChunk(f" word{i}", (i,))
            time.sleep(0.05)
        ended.append(Finished("cancelled" if cancel.is_set() else "length", 5, i, 0.1, 10.0, 0.3))
        yield ended[-1]

    app = webui.mount(fastapi.FastAPI(), chat=chat, encode=no_encode, context_window=2048, model_name="m")
    with serve(app) as url:
        page = browser.new_page()
        page.goto(url)
        message = page.locator("#message textarea")
        message.fill("Write a long story.")
        message.press("Enter")
        page.wait_for_function(f"() => {BOT_TEXT}.includes('word3')")
        message.press("Escape")  # the focus still in the message box, as after Enter
        wait_until(lambda: ended)
        assert ended[0].reason == "cancelled"
        wait_for_status(page, stats_line(ended[0]))
        page.close()


@pytest.mark.browser
@needs_chromium
def test_browser_screen_readers_hear_a_reply_once_when_it_is_written_not_each_piece(browser):
    """Gradio's chat is a polite live region, and each piece streamed rewrites the whole reply in it: a screen
    reader read "Hello", then "Hello there, friend.", and so on for every piece. While a reply is written the
    chat is no live region and busy; then the reply, rendered, goes once into a live region of its own."""
    go_on = threading.Event()

    def chat(messages, params, cancel):
        if messages[-1].content == "Refuse this":
            raise VicunaError("No.")
        yield TextChunk("Hello", (1,))
        go_on.wait(30)
        yield TextChunk(" there, **friend**.", (2,))
        yield DONE

    app = webui.mount(fastapi.FastAPI(), chat=chat, encode=no_encode, context_window=2048, model_name="m")
    chat_region = "document.querySelector('#chatbot [role=log]')"
    with serve(app) as url:
        page = browser.new_page()
        page.goto(url)
        message = page.locator("#message textarea")
        message.wait_for()
        page.wait_for_function("() => document.querySelector('#reply-announcement')")
        page.evaluate(
            """() => { window.heard = [];
            const region = document.querySelector('#reply-announcement');
            new MutationObserver(() => heard.push(region.textContent))
                .observe(region, { childList: true, characterData: true, subtree: true }); }"""
        )
        assert page.locator("#reply-announcement").get_attribute("aria-live") == "polite"
        message.fill("Hi")
        message.press("Enter")
        page.wait_for_function(f"() => {BOT_TEXT} === 'Hello'")
        assert page.evaluate(f"[{chat_region}.ariaLive, {chat_region}.ariaBusy]") == ["off", "true"]
        go_on.set()
        wait_for_status(page, stats_line(DONE))
        page.wait_for_function("() => heard.length > 0")
        assert page.evaluate("heard") == ["Hello there, friend."]
        assert page.evaluate(f"[{chat_region}.ariaLive, {chat_region}.ariaBusy]") == ["polite", "false"]

        # a message refused: the reply already read is not read again
        message.fill("Refuse this")
        message.press("Enter")
        page.get_by_text("No.").first.wait_for()
        page.wait_for_function("() => !document.querySelector('#send').disabled")
        assert page.evaluate("heard") == ["Hello there, friend."]
        assert page.evaluate(f"{chat_region}.ariaLive") == "polite"

        # the same reply written again is read again
        page.locator("#regenerate").click()
        page.wait_for_function("() => heard.length > 1")
        assert page.evaluate("heard").count("Hello there, friend.") == 2
        page.close()


@pytest.mark.browser
@needs_chromium
def test_browser_edits_an_earlier_message_and_answers_it_again(browser):
    calls: list[list[Message]] = []

    def chat(messages, params, cancel):
        calls.append(messages)
        yield TextChunk(f"Echo: {messages[-1].content}", (1,))
        yield DONE

    app = webui.mount(fastapi.FastAPI(), chat=chat, encode=no_encode, context_window=2048, model_name="m")
    with serve(app) as url:
        page = browser.new_page()
        page.goto(url)
        message = page.locator("#message textarea")
        for sent, text in enumerate(["one", "two", "three"], start=1):
            message.fill(text)
            message.press("Enter")
            # its reply shown (so Send was disabled), then Send enabled again: the reply is done
            page.wait_for_function(
                "n => document.querySelectorAll('#chatbot .bot-row').length === n", arg=sent
            )
            page.wait_for_function("() => !document.querySelector('#send').disabled")
        page.locator("#chatbot button[aria-label='Edit']").nth(1).click()  # the user's own messages only
        page.locator("#chatbot textarea").fill("TWO")
        page.locator("#chatbot button[aria-label='Submit']").click()
        wait_until(lambda: len(calls) == 4)
        assert calls[3] == [Message("user", "one"), Message("assistant", "Echo: one"), Message("user", "TWO")]
        rows = ["one", "Echo: one", "TWO", "Echo: TWO"]
        page.wait_for_function(
            "rows => JSON.stringify(Array.from(document.querySelectorAll('#chatbot .message-row'),"
            " (row) => row.innerText.trim())) === JSON.stringify(rows)",
            arg=rows,
        )
        page.reload()  # and so it is kept
        page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row').length === 4")
        assert page.locator("#chatbot .message-row").all_inner_texts()[2].strip() == "TWO"
        page.close()


@pytest.mark.browser
@needs_chromium
def test_browser_on_a_phone_shows_a_wide_table_s_words_whole_and_scrolls_it_within_the_chat(browser):
    # Gradio breaks a message's words anywhere: a table was squeezed to a few letters a line
    words = ["name", "description", "value", "another", "column"]
    reply = f"| {' | '.join(words)} |\n|{'---|' * len(words)}\n| {' | '.join(w.upper() for w in words)} |"
    with serve(replying(reply)) as url:
        context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        page = context.new_page()
        page.goto(url)
        message = page.locator("#message textarea")
        message.fill("A table, please")
        message.press("Enter")
        wait_for_status(page, stats_line(DONE))
        table = page.locator("#chatbot .bot-row table")
        # each cell's word on one line (its text one box), once the page has laid the reply out
        one_line = """() => Array.from(document.querySelectorAll('#chatbot .bot-row :is(th, td)')).every((cell) => {
            const range = document.createRange();
            range.selectNodeContents(cell);
            return range.getClientRects().length === 1;
        })"""
        page.wait_for_function(one_line, timeout=10_000)
        assert table.locator("th, td").count() == 2 * len(words)
        assert table.evaluate("t => t.scrollWidth > t.clientWidth")  # the table scrolls, not the page
        assert page.evaluate("document.documentElement.scrollWidth") == 390
        context.close()


@pytest.mark.browser
@needs_chromium
def test_browser_undo_drops_the_last_exchange_and_puts_its_message_back_before_a_draft(browser):
    def chat(messages, params, cancel):
        yield TextChunk(f"Echo: {messages[-1].content}", (1,))
        yield DONE

    app = webui.mount(fastapi.FastAPI(), chat=chat, encode=no_encode, context_window=2048, model_name="m")
    rows = (
        "() => Array.from(document.querySelectorAll('#chatbot .message-row'), (row) => row.innerText.trim())"
    )
    with serve(app) as url:
        page = browser.new_page()
        page.goto(url)
        message = page.locator("#message textarea")
        for sent, text in enumerate(["one", "two"], start=1):
            message.fill(text)
            message.press("Enter")
            page.wait_for_function(
                "n => document.querySelectorAll('#chatbot .bot-row').length === n", arg=sent
            )
            page.wait_for_function("() => !document.querySelector('#send').disabled")
        message.fill("a draft")
        page.locator("#chatbot button[aria-label='Undo']").click()
        page.wait_for_function(f"() => ({rows})().length === 2")
        assert page.evaluate(rows) == ["one", "Echo: one"]
        page.wait_for_function(
            "() => document.querySelector('#message textarea').value === 'two\\n\\na draft'"
        )
        page.reload()  # and so it is kept
        page.wait_for_function(f"() => ({rows})().length === 2")
        page.close()


# Each visible text's contrast with what is behind it, as WCAG computes it (its colour and opacities laid
# over the background colours below it, and placeholders'): [ratio, where, text], for those under 4.5:1.
LOW_CONTRAST = r"""() => {
    const rgba = (c) => { const p = c.match(/[\d.]+/g).map(Number); return [p[0], p[1], p[2], p[3] ?? 1]; };
    const luminance = (rgb) => rgb.map((v) => (v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4)
        .reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0);
    const over = (top, alpha, bottom) => bottom.map((v, i) => top[i] * alpha + v * (1 - alpha));
    const behind = (element) => {
        const layers = [];
        for (let e = element; e; e = e.parentElement) {
            const colour = rgba(getComputedStyle(e).backgroundColor);
            if (colour[3] > 0) layers.unshift(colour);
            if (colour[3] === 1) break;
        }
        return layers.reduce((rgb, colour) => over(colour, colour[3], rgb), [255, 255, 255]);
    };
    const ratio = (colour, element) => {
        let alpha = rgba(colour)[3];
        for (let e = element; e; e = e.parentElement) alpha *= Number(getComputedStyle(e).opacity);
        const back = behind(element), [a, b] = [luminance(over(rgba(colour), alpha, back)), luminance(back)];
        return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    };
    const found = [];
    const texts = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    while (texts.nextNode()) {
        const element = texts.currentNode.parentElement;
        if (texts.currentNode.textContent.trim() && element.checkVisibility({ opacityProperty: false }))
            found.push([ratio(getComputedStyle(element).color, element), element, texts.currentNode.textContent]);
    }
    for (const box of document.querySelectorAll('[placeholder]'))
        if (box.placeholder && box.checkVisibility())
            found.push([ratio(getComputedStyle(box, '::placeholder').color, box), box, box.placeholder]);
    return found.filter(([r]) => r < 4.5)
        .map(([r, e, text]) => [Math.round(r * 100) / 100, e.closest('[id]')?.id, text.trim().slice(0, 40)]);
}"""


@pytest.mark.browser
@needs_chromium
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_browser_page_s_text_has_a_contrast_of_at_least_4_5_to_1(browser, scheme):
    """WCAG's AA contrast for text: the theme's labels (3.6:1), the fields' notes and the sliders' ends
    (2.5:1), the placeholders (2.5:1, 2.1:1 dark) and Send (4.47:1) were too faint to read for many."""
    with serve(replying("Hi")) as url:
        page = browser.new_page(color_scheme=scheme)
        page.goto(url)
        message = page.locator("#message textarea")
        message.fill("Hi")
        message.press("Enter")
        wait_for_status(page, stats_line(DONE))
        # once Gradio's fading of the line while the reply was pending is over
        page.wait_for_function(
            """() => { for (let e = document.querySelector('#reply-status .prose'); e.id !== 'reply-status';
            e = e.parentElement) if (getComputedStyle(e).opacity !== '1') return false; return true; }"""
        )
        assert page.evaluate(LOW_CONTRAST) == []
        dimmed = "() => getComputedStyle(document.querySelector('#reply-status')).opacity"
        assert page.evaluate(dimmed) == "0.65"
        # not dimmed where the user asked for more contrast, nor in a contrast theme, whose colours it weakened
        for asked in [{"contrast": "more"}, {"forced_colors": "active"}]:
            page.emulate_media(**asked)
            assert page.evaluate(dimmed) == "1", asked
            page.emulate_media(contrast="no-preference", forced_colors="none")
        page.close()
