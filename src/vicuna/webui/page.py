"""The web UI's Gradio page and its event handlers; `vicuna.webui.mount` imports this module."""

from __future__ import annotations

import hmac
import threading
from collections.abc import Iterator
from typing import Any

import gradio as gr
import torch

from vicuna.config import SamplingParams
from vicuna.conversation import Message
from vicuna.engine.events import Finished, TextChunk
from vicuna.errors import VicunaError
from vicuna.webui import ChatFn

Turn = tuple[str, str, str]  # (user message, reply, the line shown under the reply)

MAX_TOKENS_LIMIT = 8192  # the slider's end; the engine refuses what does not fit its context window
OUT_OF_MEMORY = (
    "The GPU ran out of memory for this reply (beside the others being generated). Try again shortly, "
    "or with a shorter conversation (Clear)."
)
CSS = """
.vicuna-stats { font-size: 0.8em; opacity: 0.65; }
"""


def stats_line(finished: Finished) -> str:
    """What is shown under a finished reply, e.g. `42 tokens · 18.3 tokens/s · first token 0.21 s`."""
    parts = [
        f"{finished.completion_tokens} tokens",
        f"{finished.decode_tokens_per_s:.1f} tokens/s",
        f"first token {finished.ttft_s:.2f} s",
    ]
    if finished.reason == "cancelled":
        parts.append("stopped")
    elif finished.reason == "length":
        parts.append("max tokens reached")
    return " · ".join(parts)


def to_chatbot(turns: list[Turn]) -> list[dict[str, Any]]:
    """The Chatbot's messages: markdown replies, the stats line as a second, smaller part under each."""
    out: list[dict[str, Any]] = []
    for user, reply, stats in turns:
        out.append({"role": "user", "content": user})
        if stats:
            if reply.count("```") % 2:  # a reply cut off inside a code block: close it for display
                reply += "\n```"
            out.append(
                {"role": "assistant", "content": [reply, f'<span class="vicuna-stats">{stats}</span>']}
            )
        elif reply:
            out.append({"role": "assistant", "content": reply})
    return out


class WebChat:
    """The page's event handlers; one instance per mounted app, its state per browser session."""

    def __init__(self, chat: ChatFn, api_keys: set[str] | None) -> None:
        self.chat = chat
        self.api_keys = api_keys
        self.running: dict[str, threading.Event] = {}  # session -> the cancel flag of its generation

    def key_ok(self, key: str) -> bool:
        if self.api_keys is None:
            return True
        # compare_digest against every key: the time taken does not reveal how much of a key matched
        return any(hmac.compare_digest(key.encode(), k.encode()) for k in self.api_keys)

    def login(self, key: str) -> tuple[Any, ...]:
        key = key.strip()
        if not self.key_ok(key):
            return "", gr.Column(visible=True), gr.Column(visible=False), "**Invalid API key.** Try again."
        return key, gr.Column(visible=False), gr.Column(visible=True), ""

    def respond(
        self,
        text: str,
        turns: list[Turn],
        system: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        key: str,
        request: gr.Request,
    ) -> Iterator[tuple[str, list[dict[str, Any]], list[Turn]]]:
        """Send the textbox's message and stream the reply."""
        self._check_key(key)
        if not text.strip():
            yield text, to_chatbot(turns), turns
            return
        yield from self._stream(
            text, turns, [*turns, (text, "", "")], system, temperature, top_p, max_tokens, request
        )

    def regenerate(
        self,
        turns: list[Turn],
        system: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        key: str,
        request: gr.Request,
    ) -> Iterator[tuple[list[dict[str, Any]], list[Turn]]]:
        """Answer the last user message again (the textbox, maybe holding a draft, is left alone)."""
        self._check_key(key)
        if not turns:
            yield [], []
            return
        redo = [*turns[:-1], (turns[-1][0], "", "")]
        for _, shown, now in self._stream("", turns, redo, system, temperature, top_p, max_tokens, request):
            yield shown, now

    def stop(self, request: gr.Request) -> None:
        cancel = self.running.get(request.session_hash or "")
        if cancel is not None:
            cancel.set()

    def clear(self, request: gr.Request) -> tuple[list, list, str]:
        self.stop(request)
        return [], [], ""

    def _check_key(self, key: str) -> None:
        if not self.key_ok(key):
            raise gr.Error("A valid API key is needed: enter it at the top of the page.")

    def _stream(
        self,
        text: str,
        before: list[Turn],
        turns: list[Turn],
        system: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        request: gr.Request,
    ) -> Iterator[tuple[str, list[dict[str, Any]], list[Turn]]]:
        """Generate the last turn's reply; on an error, put things back as they were and say why."""
        session = request.session_hash or ""
        if (previous := self.running.get(session)) is not None:
            previous.set()  # one generation per browser session: a new one replaces the old
        cancel = self.running[session] = threading.Event()
        user = turns[-1][0]
        messages = [Message("system", system)] if system.strip() else []  # empty: the template's own
        for past_user, past_reply, _ in turns[:-1]:
            messages += [Message("user", past_user), Message("assistant", past_reply)]
        messages.append(Message("user", user))
        reply = ""
        try:
            yield "", to_chatbot(turns), turns
            params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=int(max_tokens))
            for event in self.chat(messages, params, cancel):
                if isinstance(event, TextChunk):
                    if event.text:
                        reply += event.text
                        turns = [*turns[:-1], (user, reply, "")]
                        yield "", to_chatbot(turns), turns
                elif isinstance(event, Finished):
                    turns = [*turns[:-1], (user, reply, stats_line(event))]
                    yield "", to_chatbot(turns), turns
        except VicunaError as err:
            yield text, to_chatbot(before), before
            raise gr.Error(str(err)) from None
        except torch.OutOfMemoryError:  # the engine or the batcher has given the GPU its memory back
            yield text, to_chatbot(before), before
            raise gr.Error(OUT_OF_MEMORY) from None
        finally:
            cancel.set()  # also when the page goes away mid-reply and Gradio closes this generator
            if self.running.get(session) is cancel:
                del self.running[session]


def build(
    chat: ChatFn, *, model_name: str, api_keys: set[str] | None = None, default_system: str = ""
) -> gr.Blocks:
    """The Gradio page, not yet mounted."""
    ui = WebChat(chat, api_keys)
    with gr.Blocks(title=f"{model_name} · vicuna", analytics_enabled=False) as demo:
        key = gr.State("")
        turns = gr.State([])
        gr.Markdown(f"## {model_name}")
        with gr.Column(visible=api_keys is not None) as login_box:
            key_box = gr.Textbox(
                label="API key",
                type="password",
                placeholder="This server needs an API key",
                elem_id="api-key",
            )
            key_button = gr.Button("Enter", elem_id="api-key-enter")
            key_message = gr.Markdown(elem_id="api-key-message")
        with gr.Column(visible=api_keys is None) as chat_box, gr.Row():
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(
                    label=model_name, height=520, buttons=["copy"], elem_id="chatbot", feedback_options=None
                )
                with gr.Row():
                    textbox = gr.Textbox(
                        show_label=False,
                        placeholder="Type a message and press Enter",
                        scale=8,
                        autofocus=True,
                        elem_id="message",
                    )
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                with gr.Row():
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=1, min_width=240):
                system = gr.Textbox(
                    label="System prompt",
                    value=default_system,
                    lines=5,
                    info="Empty: the model's own default.",
                    elem_id="system",
                )
                temperature = gr.Slider(
                    0, 2, value=0.7, step=0.05, label="Temperature", elem_id="temperature"
                )
                top_p = gr.Slider(0.01, 1, value=1.0, step=0.01, label="Top-p", elem_id="top-p")
                max_tokens = gr.Slider(
                    1, MAX_TOKENS_LIMIT, value=512, step=1, label="Max new tokens", elem_id="max-tokens"
                )

        settings = [system, temperature, top_p, max_tokens, key]
        # concurrency_limit=None: many browser sessions generate at once; the engine batches them
        sending = gr.on(
            [textbox.submit, send.click],
            ui.respond,
            [textbox, turns, *settings],
            [textbox, chatbot, turns],
            concurrency_limit=None,
            api_name="chat",
        )
        again = regenerate.click(
            ui.regenerate, [turns, *settings], [chatbot, turns], concurrency_limit=None, api_name="regenerate"
        )
        # Stop lets the reply finish with its stats ("stopped"); Clear also drops what is still streaming.
        stop.click(ui.stop, None, None, queue=False, api_visibility="private")
        gr.on(  # the Clear button and the chatbot's own trash icon
            [clear.click, chatbot.clear],
            ui.clear,
            None,
            [chatbot, turns, textbox],
            queue=False,
            cancels=[sending, again],
            api_visibility="private",
        )
        gr.on(
            [key_button.click, key_box.submit],
            ui.login,
            key_box,
            [key, login_box, chat_box, key_message],
            api_visibility="private",
        )
    return demo
