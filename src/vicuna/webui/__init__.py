"""The web UI at `/`: a Gradio chat page mounted in the API server's FastAPI app.

It talks to the engine in the same process through a `chat` callable (the server's batching
scheduler), so browser users and API clients share one batch. Features: streamed markdown replies,
a system prompt, temperature / top-p / max-tokens controls, stop, regenerate, edit, undo, clear, the last
reply's tokens/s under the chat, and the conversation, the system prompt and the settings kept in the
browser across reloads. With API keys the page asks for a key first, and every chat request checks the
key again on the server. The page takes no files: Gradio's upload routes are refused, as is a body over
`BODY_BYTES_PER_TOKEN` bytes per token of the context window, and the page loads no image from elsewhere
(`CONTENT_SECURITY_POLICY`).
The page is in Simplified Chinese for a browser that prefers it, else in English (`vicuna.webui.texts`).
Gradio is imported only when the UI is mounted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from vicuna.config import SamplingParams
from vicuna.conversation import Message
from vicuna.engine.events import Event

if TYPE_CHECKING:
    import fastapi

ChatFn = Callable[[list[Message], SamplingParams, threading.Event], Iterator[Event]]
EncodeFn = Callable[[list[Message]], list[int]]

# The page's requests carry the message, the settings and the whole conversation, kept in the browser (its
# oldest exchanges left out of the prompt): this many bytes for each token of the context window is room for
# a conversation hundreds of windows long. Gradio reads any body whole before a handler sees it: one request
# of 300 MB, sent without an API key, grew the server by 900 MB, which it kept.
BODY_BYTES_PER_TOKEN = 1024


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before more of it is read."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from starlette.datastructures import Headers
        from starlette.exceptions import HTTPException
        from starlette.responses import PlainTextResponse

        message = f"the request body is larger than this server takes: {self.limit} bytes"
        declared = Headers(scope=scope).get("content-length", "") if scope["type"] == "http" else ""
        if declared.isdigit() and int(declared) > self.limit:
            await PlainTextResponse(message, status_code=413)(scope, receive, send)
            return
        received = 0

        async def bounded() -> Any:  # a body without its length declared (chunked): counted as it comes
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, message)
            return event

        await self.app(scope, bounded if scope["type"] == "http" else receive, send)


# Gradio runs each call of a handler in one of its threads, and at most that many of the page's queued events at
# once, for all browser sessions together: 40 by default. A chat holds one from its message to its reply's end,
# waiting for a batch row too. With 40 chats waiting (a script's request holding every row), every other handler
# waited for one of them to end: Stop answered 41 s later, a page load or a 41st message as late, unseen by the
# server's queue. The page takes that many for its other handlers, and one more for each chat the server admits.
GRADIO_THREADS = 40


# What the page may load besides its own files: no image, audio or video from elsewhere. A reply is markdown
# with HTML, and Gradio's sanitizing keeps an <img>, ![](url), <video>, <audio> and CSS url(): text that
# steers the model (a pasted page, a document) had it write one whose URL carried the conversation out,
# fetched by the browser as the reply was shown. The model writes text only; its replies need no images.
CONTENT_SECURITY_POLICY = "img-src 'self' data: blob:; media-src 'self' data: blob:"


class ContentPolicy:
    """ASGI middleware: each response says `CONTENT_SECURITY_POLICY` to the browser."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from starlette.datastructures import MutableHeaders

        async def with_policy(message: Any) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
            await send(message)

        await self.app(scope, receive, with_policy)


def mount(
    app: fastapi.FastAPI,
    *,
    chat: ChatFn,
    encode: EncodeFn,
    context_window: int,
    model_name: str,
    api_keys: set[str] | None = None,
    max_chats: int = 0,
) -> fastapi.FastAPI:
    """Mount the chat page at `/` of `app` and return `app`. Add the app's own routes first: a mount
    at `/` answers every path that no earlier route took. `chat(messages, params, cancel)` streams a
    reply and ends it with "cancelled" soon after `cancel` is set. `encode(messages)` is the prompt's
    token ids, by which the page leaves out the oldest exchanges that do not fit `context_window` (the
    model's, in tokens; also the max-tokens slider's end), or asks for what fits. `max_chats`: how many
    replies `chat` takes at once (running and waiting; it refuses more), each given a thread of its own."""
    import gradio as gr
    from fastapi.responses import PlainTextResponse

    from vicuna.webui.page import CSS, PAGE_SCRIPT, build

    # The page has no file inputs, so nothing may be stored through Gradio's upload routes (they would
    # keep any file under /tmp/gradio, without asking for an API key). Routes added before the mount win.
    # No return annotation: FastAPI would look its name up in this module's globals, where pydantic 2.9
    # fails to find it (the import is local).
    def no_uploads():
        return PlainTextResponse("this server takes no file uploads", status_code=403)

    for route in ("upload", "process_recording"):
        app.add_api_route(f"/gradio_api/{route}", no_uploads, methods=["POST"], include_in_schema=False)

    demo = build(
        chat,
        encode,
        model_name=model_name,
        api_keys=api_keys,
        context_window=context_window,
    )
    # as launch(max_threads=) sets it, which mounting lacks: queue() makes the queue again with that many jobs
    demo.max_threads = GRADIO_THREADS + max_chats
    demo.queue()
    # System fonts: the default theme fetches Google Fonts, which an offline server cannot reach. Its colours
    # darkened where its text had less than WCAG's 4.5:1 contrast: the labels (3.6:1), the fields' notes and
    # the sliders' ends (2.5:1), the placeholders (2.5:1; 2.1:1 dark) and Send (4.47:1).
    theme = gr.themes.Soft(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    ).set(
        body_text_color_subdued="*neutral_600",
        block_label_text_color="*primary_700",
        block_title_text_color="*primary_700",
        input_placeholder_color="*neutral_500",
        input_placeholder_color_dark="*neutral_300",
        button_primary_background_fill="*primary_600",
        button_primary_background_fill_hover="*primary_700",
    )
    # show_error=False: an unexpected exception's text stays in the server log; gr.Error messages
    # (a bad key, a prompt too long for the context window) are still shown to the user.
    gr.mount_gradio_app(
        app,
        demo,
        path="/",
        theme=theme,
        css=CSS,
        js=PAGE_SCRIPT,
        show_error=False,
        run_history=False,
        ssr_mode=False,
        footer_links=[],
    )
    page = app.routes[-1].app  # the Gradio app just mounted
    page.add_middleware(BodyLimit, limit=BODY_BYTES_PER_TOKEN * context_window)
    page.add_middleware(ContentPolicy)
    return app
