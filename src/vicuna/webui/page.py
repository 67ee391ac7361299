"""The web UI's Gradio page and its event handlers; `vicuna.webui.mount` imports this module."""

from __future__ import annotations

import hmac
import logging
import math
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import gradio as gr

from vicuna.config import SamplingParams
from vicuna.conversation import Message, fit_history
from vicuna.engine.events import Event, Finished, TextChunk
from vicuna.engine.memory import out_of_memory
from vicuna.errors import VicunaError
from vicuna.webui import ChatFn, EncodeFn
from vicuna.webui.texts import HTML_LANG, language, say

Turn = tuple[str, str, str]  # (user message, reply, the reply's stats line)
# A browser session's oldest exchanges its last prompt left out, and a hash of their text: the next
# prompt leaves them out too (`fit_history`), where the conversation still begins with them.
LeftOut = tuple[int, int]

TEMPERATURE = (0.0, 2.0)  # the sliders' ranges; a value outside them is refused
TOP_P = (0.01, 1.0)
WRITING = (
    "Writing the reply… **Stop** ends it. What you type meanwhile waits in the box: press Enter when "
    "the reply is done."
)
# Under a conversation whose last reply has no stats: it was being written when its page was reloaded or
# closed, which ended it (the server stops a reply its page left).
CUT_SHORT = (
    "The last reply was cut short: its page was reloaded or closed while it was written. **Regenerate** "
    "writes it again."
)
OUT_OF_MEMORY = (
    "The GPU ran out of memory for this reply (beside the others being generated). Try again shortly, "
    "or with a shorter conversation (Clear)."
)
# Gradio keeps each browser session's state on the server (a copy of the page's settings, the last values
# shown, the API key entered, the exchanges left out of the prompt) until the session is one of more than
# this many, the oldest used first; by default 10,000, and each one-turn chat's session took some 70 KB.
# The conversation itself is kept in the browser, so a session dropped loses only the key entered (the
# page asks for it again after a reload) and the count of exchanges left out (found again).
# 500 is several times the replies a server runs and queues at once (16 rows and 64 waiting by default).
# A session's state grows with its conversation, whose last values shown it holds: 0.65 MB for a session
# whose conversation is 200 KB (some 3 copies of it), so 500 sessions take ~35 MB for one-turn chats and
# ~330 MB for such long ones, kept until newer sessions push them out (a closed page's is kept too).
SESSION_CAPACITY = 500
# While a reply streams, the conversation is stored in the browser (for a reload) at most once in this many
# seconds, not with each piece: the page encrypts and writes the whole conversation each time, and with a
# 100 KB conversation kept, a 1,500-piece reply took the page 25.6 s to show instead of 12.3 s (11.9 s now).
# A reload keeps the reply as it was at the last write; the stream's last answer stores it whole.
STORE_EVERY_S = 1.0
# A UTF-16 surrogate alone (JSON can carry "\ud800", so any client of Gradio's routes can send one) is no
# character: the tokenizer failed on it with a TypeError, and the page showed a bare "Error" and the server
# log a traceback, for each such message or system prompt. The API refuses it as a 400.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
NOT_TEXT = "The message or the system prompt holds a lone UTF-16 surrogate, which is no character: send text."
# Run in the browser after a message failed: it goes back in the box, before any draft the user typed there
# meanwhile (the box is editable while a reply is written), a blank line between them, and is then
# forgotten. In the browser, not on the server: a round trip would lose what is typed while it lasts.
PUT_BACK = "(unsent, box) => [[unsent, box].filter((text) => text && text.trim()).join('\\n\\n'), '']"
# The maths a reply may hold, rendered by KaTeX: Gradio's default is $$...$$ alone, but models write LaTeX's
# own \(...\) and \[...\] as often, and those were shown as markdown made them, backslashes taken as
# escapes: "(x^2 + y^2)" and "[ \int_0^1 x,dx ]". Not $...$: "it costs $5, or $10 with tax" would be maths.
LATEX = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
]
# Run in the browser once the page is loaded. Escape stops the reply being written, wherever the focus is, as
# in text-generation-webui; without it, a keyboard user reached Stop by tabbing out of the message box. Not
# while an input method composes (Escape then cancels the composition, e.g. of Chinese).
# And a screen reader reads each reply once, when it is written: Gradio's chat is a polite live region, and
# each piece streamed rewrites the whole reply in it, which a screen reader read out again and again ("Hello",
# "Hello there", "Hello there, this", ...) until the reply ended. While a reply is written (Send disabled) the
# chat is no live region, and busy; then the reply is put in a live region of its own, read once (not where it
# is the one already there: a reply refused before it began). And "Invalid API key" is read out where it appears:
# a screen reader said nothing after a wrong key, the focus left in its box.
PAGE_SCRIPT = """() => {
    document.addEventListener('keydown', (event) => {
        if (event.key === 'Escape' && !event.isComposing) document.querySelector('#stop')?.click();
    });
    document.querySelector('#api-key-message')?.setAttribute('aria-live', 'polite');
    const announcement = Object.assign(document.createElement('div'), { id: 'reply-announcement' });
    announcement.setAttribute('aria-live', 'polite');
    document.body.append(announcement);
    const lastReply = () => [...document.querySelectorAll('#chatbot .bot-row')].at(-1)?.innerText.trim() ?? '';
    let before = null;  // the last reply when Send was disabled, while it is
    new MutationObserver(() => {
        const send = document.querySelector('#send'), chat = document.querySelector('#chatbot [role=log]');
        if (!send || !chat || send.disabled === (before !== null)) return;
        chat.setAttribute('aria-live', send.disabled ? 'off' : 'polite');
        chat.setAttribute('aria-busy', String(send.disabled));
        if (send.disabled) {
            before = lastReply();
            return;
        }
        const reply = lastReply();
        if (reply && reply !== before) announcement.textContent = reply;
        before = null;
    }).observe(document.body, { subtree: true, attributes: true, attributeFilter: ['disabled'] });
}"""
# A table wider than the chat scrolls sideways within it, each word whole. Gradio breaks a message's words
# anywhere, so on a phone (390 px) a five-column table was squeezed to a few letters a line ("de/cr/ip/ti/on").
# The line under the chat is dimmed, but not where the user asked for more contrast (macOS' "Increase
# contrast", Windows' contrast themes), which the dimming took back. The live region that reads a reply out
# (`PAGE_SCRIPT`) is heard, not seen. Each message says whose it is to a screen reader (CSS's alternative
# text, nothing drawn), in the page's language (`WebChat.page_language`): the chat told them apart by where
# they are drawn alone.
CSS = """
#reply-status { font-size: 0.8em; opacity: 0.65; min-height: 1.5em; }
@media (prefers-contrast: more), (forced-colors: active) { #reply-status { opacity: 1; } }
#chatbot table {
  display: block; width: max-content; max-width: 100%; overflow-x: auto; padding: 0; border: 0;
}
#chatbot :is(td, th) { word-break: normal; overflow-wrap: normal; }
#reply-announcement { position: absolute; width: 1px; height: 1px; overflow: hidden; clip-path: inset(50%); }
""" + "".join(
    f'#chatbot .{row}-row .message-content{when}::before {{ content: "" / "{say(lang, label)}"; }}\n'
    for lang, when in [("en", ""), ("zh", ":lang(zh)")]
    for row, label in [("user", "You:"), ("bot", "Assistant:")]
)

log = logging.getLogger("vicuna.webui")


def stats_line(finished: Finished, cut: bool = False, dropped: int = 0, lang: str = "en") -> str:
    """What is shown under the chat after a reply, e.g. `42 tokens · 18.3 tokens/s · first token 0.21 s`,
    in `lang` (`texts.language`). `cut`: max new tokens was lowered to the room the context window left;
    `dropped`: the oldest exchanges left out of the prompt to fit the context window."""
    parts = [say(lang, "{count} tokens", count=finished.completion_tokens)]
    if finished.completion_tokens:  # a reply stopped before its first token has no speed to show
        parts += [
            say(lang, "{rate:.1f} tokens/s", rate=finished.decode_tokens_per_s),
            say(lang, "first token {seconds:.2f} s", seconds=finished.ttft_s),
        ]
    if finished.reason == "cancelled":
        parts.append(say(lang, "stopped"))
    elif finished.reason == "length":
        parts.append(say(lang, "context window full" if cut else "max tokens reached"))
    if dropped:
        parts.append(
            say(lang, "the oldest {count} exchange(s) left out to fit the context window", count=dropped)
        )
    return " · ".join(parts)


def to_chatbot(turns: list[Turn]) -> list[dict[str, Any]]:
    """The Chatbot's messages: the replies as markdown. The stats stay out of them (they are shown under
    the chat), so a message's copy button copies its text alone."""
    out: list[dict[str, Any]] = []
    for user, reply, stats in turns:
        out.append({"role": "user", "content": user})
        if stats and reply.count("```") % 2:  # a reply cut off inside a code block: close it for display
            reply += "\n```"
        if reply:
            out.append({"role": "assistant", "content": reply})
    return out


def turn_of(turns: list[Turn], index: int) -> int | None:
    """Which of `turns` has its user message at `index` of the chatbot's messages (`to_chatbot`, where an
    empty reply has none); None for a reply's."""
    position = 0
    for turn, (_, reply, _) in enumerate(turns):
        if position == index:
            return turn
        position += 2 if reply else 1
    return None


def last_stats(turns: list[Turn]) -> str:
    return turns[-1][2] if turns else ""


def sampling_params(
    temperature: float, top_p: float, max_tokens: float, max_tokens_limit: int, lang: str = "en"
) -> SamplingParams:
    """The sliders' values as SamplingParams (max new tokens rounded to a whole number); a value
    outside its slider's range is refused, in `lang`."""
    for name, value, (low, high) in [
        ("Temperature", temperature, TEMPERATURE),
        ("Top-p", top_p, TOP_P),
        ("Max new tokens", max_tokens, (1, max_tokens_limit)),
    ]:
        if not isinstance(value, int | float) or not low <= value <= high:  # also None and NaN
            raise VicunaError(
                say(
                    lang,
                    "{name} must be a number from {low:g} to {high:g} (it is {value}).",
                    name=say(lang, name),
                    low=low,
                    high=high,
                    value=value,
                )
            )
    return SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=round(max_tokens))


def left_out_of(turns: list[Turn], count: int) -> LeftOut:
    """The session's state after a prompt that left out the `count` oldest of `turns`."""
    return count, hash(tuple((user, reply) for user, reply, _ in turns[:count]))


def still_left_out(turns: list[Turn], left_out: LeftOut | None) -> int:
    """How many exchanges the next prompt is to leave out from the start: as many as the last, where the
    conversation begins as it did (after Regenerate, or a message sent), else none: it was cleared, or it
    is another one, e.g. the one kept in the browser shown again after a reload."""
    count = left_out[0] if left_out else 0
    return count if count < len(turns) and left_out_of(turns, count) == left_out else 0


def request_language(request: gr.Request) -> str:
    """The language of the page for this request's browser (`texts.language`): "zh" or "en"."""
    headers = getattr(request, "headers", None) or {}  # none where a test makes the request
    return language(headers.get("accept-language"))


def user_error(message: str) -> gr.Error:
    """The error shown to the user, and one line in the server log instead of Gradio's traceback."""
    log.info("refused: %s", message)
    return gr.Error(message, print_exception=False)


class WebChat:
    """The page's event handlers; one instance per mounted app, its state per browser session.

    A reply's handlers yield the textbox, the message not sent, the chatbot, the status line under it,
    the conversation and the Send and Regenerate buttons (disabled while the reply is written). The
    textbox is cleared once, when its message is taken, and then left alone: the user may be typing the
    next message. A message that fails is put back in the box by the page itself (`PUT_BACK`), before
    what the box holds by then, which the server does not know. They also yield the session's
    `LeftOut`, after the conversation. What they say is in the browser's language (`request_language`)."""

    def __init__(
        self, chat: ChatFn, encode: EncodeFn, context_window: int, api_keys: set[str] | None = None
    ) -> None:
        self.chat, self.encode, self.context_window = chat, encode, context_window
        self.api_keys = api_keys
        self.running: dict[str, threading.Event] = {}  # session -> the cancel flag of its generation
        self.words: list[dict[str, str]] = []  # see `show`

    def key_ok(self, key: str) -> bool:
        if self.api_keys is None:
            return True
        try:
            sent = key.encode()
        except UnicodeEncodeError:  # a lone surrogate (JSON can send one): a wrong key, not a traceback
            return False
        # compare_digest against every key: the time taken does not reveal how much of a key matched
        return any(hmac.compare_digest(sent, k.encode()) for k in self.api_keys)

    def login(self, key: str, request: gr.Request) -> tuple[Any, ...]:
        key = key.strip()
        if not self.key_ok(key):
            invalid = say(request_language(request), "**Invalid API key.** Try again.")
            return "", gr.Column(visible=True), gr.Column(visible=False), invalid
        return key, gr.Column(visible=False), gr.Column(visible=True), ""

    def ask_key_again(self, key: str) -> Any:
        """After a failed reply: the key box, shown again above the chat where the session's key is not
        valid. The server forgets a key entered when it restarts, or drops the session's state for newer
        ones' (`SESSION_CAPACITY`); the error said to enter the key at the top of the page, where there
        was no box to enter it in until a reload."""
        return gr.Column(visible=not self.key_ok(key))

    def show(self, turns: list[Turn], request: gr.Request) -> tuple[Any, ...]:
        """On load: the chatbot and the status line for a conversation (the one kept in the browser; a
        reply left unfinished by a reload is said to be, `CUT_SHORT`: the line was empty, as under a whole
        one), and the words of the page's components `self.words` (set by `build`: each one's English
        texts by property) in the browser's language; left as they are in English."""
        lang = request_language(request)
        words = [
            gr.update(**{name: say(lang, text) for name, text in texts.items()})
            if lang != "en"
            else gr.skip()
            for texts in self.words
        ]
        status = last_stats(turns) or (say(lang, CUT_SHORT) if turns else "")
        return to_chatbot(turns), status, *words

    @staticmethod
    def page_language(request: gr.Request) -> str:
        """On load: the page's `lang` attribute, of the language its words are in (`request_language`).
        Gradio sets it to the browser's own language: a French browser's English page said `lang="fr"`,
        and a screen reader read its English in a French voice; Chinese words under an English browser
        were read in an English voice."""
        return HTML_LANG[request_language(request)]

    @staticmethod
    def keep_settings(system: str, temperature: float, top_p: float, max_tokens: float) -> dict[str, Any]:
        """The system prompt and the sliders, for the browser to keep beside the conversation."""
        return {"system": system, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}

    def restore_settings(self, kept: Any) -> tuple[Any, ...]:
        """On load: the system prompt and the sliders as `keep_settings` left them in the browser. A reload
        kept the conversation but not its system prompt, and the next message went on under the template's
        own, the box empty as if none had been set. What the browser sends is checked as a message's
        settings are; max new tokens is lowered to this model's context window (a server restarted with
        another model); anything else amiss leaves that setting as the page drew it."""
        kept = kept if isinstance(kept, dict) else {}
        system = kept.get("system")
        restored = [gr.update(value=system) if isinstance(system, str) else gr.skip()]
        for name, (low, high) in [
            ("temperature", TEMPERATURE),
            ("top_p", TOP_P),
            ("max_tokens", (1, math.inf)),
        ]:
            value = kept.get(name)
            valid = isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high
            valid = valid and math.isfinite(value)  # Infinity: within (1, inf), and round() raises on it
            if name == "max_tokens" and valid:
                value = min(round(value), self.context_window)
            restored.append(gr.update(value=value) if valid else gr.skip())
        return tuple(restored)

    def respond(
        self,
        text: str,
        turns: list[Turn],
        left_out: LeftOut | None,
        system: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        key: str,
        request: gr.Request,
    ) -> Iterator[tuple[Any, ...]]:
        """Send the textbox's message and stream the reply."""
        lang = request_language(request)
        self._check_key(key, lang)
        if not text.strip():
            yield (gr.skip(),) * 8
            return
        params = self._params(temperature, top_p, max_tokens, lang)
        yield from self._stream(text, turns, [*turns, (text, "", "")], left_out, system, params, request)

    def regenerate(
        self,
        turns: list[Turn],
        left_out: LeftOut | None,
        system: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        key: str,
        request: gr.Request,
    ) -> Iterator[tuple[Any, ...]]:
        """Answer the last user message again (the textbox, maybe holding a draft, is left alone)."""
        lang = request_language(request)
        self._check_key(key, lang)
        if not turns:
            yield [], "", [], gr.skip(), gr.skip(), gr.skip()
            return
        params = self._params(temperature, top_p, max_tokens, lang)
        yield from self._answer_again(turns, len(turns) - 1, turns[-1][0], left_out, system, params, request)

    def edit(
        self,
        turns: list[Turn],
        left_out: LeftOut | None,
        system: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        key: str,
        edited: gr.EditData,
        request: gr.Request,
    ) -> Iterator[tuple[Any, ...]]:
        """A user message edited in the chat (its pencil) is answered again, as Regenerate answers the last:
        what came after it answered the message before the edit, and goes. An edit to nothing leaves the
        conversation as it was. Outputs as `regenerate`'s."""
        lang = request_language(request)
        self._check_key(key, lang)
        turn = turn_of(turns, edited.index) if isinstance(edited.index, int) else None
        text = edited.value if isinstance(edited.value, str) else ""
        if turn is None or not text.strip():
            yield to_chatbot(turns), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        params = self._params(temperature, top_p, max_tokens, lang)
        yield from self._answer_again(turns, turn, text, left_out, system, params, request)

    def _answer_again(
        self,
        turns: list[Turn],
        at: int,
        text: str,
        left_out: LeftOut | None,
        system: str,
        params: SamplingParams,
        request: gr.Request,
    ) -> Iterator[tuple[Any, ...]]:
        """Turn `at` answered again with `text` as its message, the turns after it gone (Regenerate's and an
        edit's): `_stream`'s outputs but the textbox's, which keeps what the user was typing."""
        redo = [*turns[:at], (text, "", "")]
        for _, _, *outputs in self._stream("", turns, redo, left_out, system, params, request):
            yield tuple(outputs)

    def undo(self, turns: list[Turn], request: gr.Request) -> tuple[Any, ...]:
        """The chat's undo arrow (under the last reply): the last exchange goes, its message back in the box
        (`PUT_BACK`) to edit and send again. While a reply is written it does nothing: Stop it first.
        Outputs: chatbot, status, conversation, the message for the box."""
        if not turns or request.session_hash in self.running:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        kept = turns[:-1]
        return to_chatbot(kept), last_stats(kept), kept, turns[-1][0]

    def stop(self, request: gr.Request) -> None:
        cancel = self.running.get(request.session_hash or "")
        if cancel is not None:
            cancel.set()

    def clear(self, request: gr.Request) -> tuple[Any, ...]:
        """Drop the conversation (and a reply being written): chatbot, status, turns, textbox, buttons.
        A reply being written is dropped, not stopped: it sends nothing more but the page cleared (see
        `_stream`). Stopped, it went on to send its pieces and its stats after this answer, and the page
        showed the conversation again, as if Clear had not been pressed."""
        cancel = self.running.pop(request.session_hash or "", None)
        if cancel is not None:
            cancel.set()
        return [], "", [], "", gr.update(interactive=True), gr.update(interactive=True)

    def _check_key(self, key: str, lang: str) -> None:
        if not self.key_ok(key):
            raise user_error(say(lang, "A valid API key is needed: enter it at the top of the page."))

    def _params(self, temperature: float, top_p: float, max_tokens: float, lang: str) -> SamplingParams:
        try:
            return sampling_params(temperature, top_p, max_tokens, self.context_window, lang)
        except VicunaError as err:
            raise user_error(str(err)) from None

    def _open(
        self,
        messages: list[Message],
        params: SamplingParams,
        cancel: threading.Event,
        left_out: int,
        lang: str,
    ) -> tuple[Iterator[Event], bool, int]:
        """Start the reply to the prompt `fit_history` makes, as the terminal chat does: the oldest
        exchanges (never the system prompt) left out, `left_out` or more, for the prompt to leave max new
        tokens of room in the context window; where the last message alone leaves less, the reply gets
        what is left (True: so cut); a message that fills the window is refused. Also answers how many
        exchanges were left out."""
        prompt, left_out, room = fit_history(
            self.encode, self.context_window, messages, params.max_new_tokens, left_out
        )
        if room < 1:  # the prompt is then the system prompt (if any) and the message: either may be long
            text = (
                "The message and the system prompt make a prompt of {tokens} tokens, but the model's context "
                "window is {window} tokens: shorten one of them."
                if prompt[0].role == "system"
                else "The message makes a prompt of {tokens} tokens, but the model's context window is "
                "{window} tokens: shorten it."
            )
            raise VicunaError(say(lang, text, tokens=self.context_window - room, window=self.context_window))
        cut = room < params.max_new_tokens
        if cut:
            params = replace(params, max_new_tokens=room)
        return self.chat(prompt, params, cancel), cut, left_out

    def _stream(
        self,
        text: str,
        before: list[Turn],
        turns: list[Turn],
        left_out: LeftOut | None,
        system: str,
        params: SamplingParams,
        request: gr.Request,
    ) -> Iterator[tuple[Any, ...]]:
        """Generate the last turn's reply; on an error, put things back as they were and say why."""
        session, lang = request.session_hash or "", request_language(request)
        if (previous := self.running.get(session)) is not None:
            previous.set()  # one generation per browser session: a new one replaces the old
        cancel = self.running[session] = threading.Event()
        user = turns[-1][0]
        messages = [Message("system", system)] if system.strip() else []  # empty: the template's own
        for past_user, past_reply, _ in turns[:-1]:
            messages += [Message("user", past_user), Message("assistant", past_reply)]
        messages.append(Message("user", user))
        reply, same, busy = "", gr.skip(), gr.update(interactive=False)
        try:
            yield "", same, to_chatbot(turns), say(lang, WRITING), turns, same, busy, busy
            if any(LONE_SURROGATE.search(m.content) for m in messages):
                raise VicunaError(NOT_TEXT)
            left = still_left_out(turns, left_out)
            events, cut, dropped = self._open(messages, params, cancel, left, lang)
            stored_at = time.monotonic()
            for event in events:
                if isinstance(event, TextChunk):
                    # a reply starts at its first visible character, as in the terminal and the API: the
                    # text continues the prompt, and "ASSISTANT:" is followed by " The..."
                    if piece := event.text if reply else event.text.lstrip():
                        reply += piece
                        turns = [*turns[:-1], (user, reply, "")]
                        if self.running.get(session) is cancel:  # else dropped: Clear, or a newer reply
                            stored = same
                            if time.monotonic() - stored_at >= STORE_EVERY_S:
                                stored, stored_at = turns, time.monotonic()
                            yield same, same, to_chatbot(turns), same, stored, same, same, same
                elif isinstance(event, Finished):
                    turns = [*turns[:-1], (user, reply, stats_line(event, cut, dropped, lang))]
        except VicunaError as err:
            yield self._put_back(before, unsent=text)
            raise user_error(say(lang, str(err))) from None  # the busy server's words are in `texts`
        except Exception as err:  # the page is put back as it was
            yield self._put_back(before, unsent=text)
            if not out_of_memory(err):  # a bug: the traceback goes to the log
                raise
            log.warning("the GPU ran out of memory for a reply")  # the engine or batcher gave it back
            raise gr.Error(say(lang, OUT_OF_MEMORY), print_exception=False) from None
        finally:
            cancel.set()  # also when the page goes away mid-reply and Gradio closes this generator
            kept = self.running.get(session) is cancel
            if kept:
                del self.running[session]
        if kept:
            yield self._put_back(turns, left_out=left_out_of(turns, dropped))
        elif session not in self.running:  # dropped by Clear: the page ends cleared, after the pieces sent
            yield self._put_back([], left_out=None)

    @staticmethod
    def _put_back(turns: list[Turn], unsent: Any = gr.skip(), left_out: Any = gr.skip()) -> tuple[Any, ...]:
        """The page showing `turns`, with Send and Regenerate ready again and the box as the user left it;
        `unsent`: the message that failed, for the page to put back in the box (before a draft there);
        `left_out`: the session's `LeftOut` after a reply."""
        ready = gr.update(interactive=True)
        return gr.skip(), unsent, to_chatbot(turns), last_stats(turns), turns, left_out, ready, ready


def build(
    chat: ChatFn,
    encode: EncodeFn,
    *,
    model_name: str,
    context_window: int,
    api_keys: set[str] | None = None,
) -> gr.Blocks:
    """The Gradio page, not yet mounted. `context_window` (tokens) is also the max-tokens slider's end."""
    ui = WebChat(chat, encode, context_window, api_keys)
    worded: list[Any] = []  # the components whose words the page's load puts in the browser's language

    def words(make: Any, texts: dict[str, str], **kwargs: Any) -> Any:
        """`make(**texts, **kwargs)`, its English `texts` kept for `WebChat.show`."""
        component = make(**texts, **kwargs)
        worded.append(component)
        ui.words.append(texts)
        return component

    with gr.Blocks(title=f"{model_name} · vicuna", analytics_enabled=False) as demo:
        demo.state_session_capacity = SESSION_CAPACITY  # not a parameter of Blocks nor of its mounting
        key = gr.State("")
        # The conversation lives in the browser's localStorage, so a reload (or a server restart) keeps
        # it. A fixed secret: Gradio's random one changes with each start, losing what was kept; and the
        # page carries the secret to the browser anyway, so it never hid anything.
        turns = gr.BrowserState([], storage_key="vicuna-conversation", secret="vicuna-conversation")
        left_out = gr.State(None)  # LeftOut, on the server: the page starts each session with none
        # The system prompt and the sliders, kept beside the conversation (`WebChat.restore_settings`).
        settings_kept = gr.BrowserState(None, storage_key="vicuna-settings", secret="vicuna-settings")
        gr.Markdown(f"## {model_name}")
        with gr.Column(visible=api_keys is not None) as login_box:
            key_box = words(
                gr.Textbox,
                {"label": "API key", "placeholder": "This server needs an API key"},
                type="password",
                elem_id="api-key",
            )
            key_button = words(gr.Button, {"value": "Enter"}, elem_id="api-key-enter")
            key_message = gr.Markdown(elem_id="api-key-message")
        with gr.Column(visible=api_keys is None) as chat_box, gr.Row():
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(
                    label=model_name,
                    height=520,
                    buttons=["copy"],
                    elem_id="chatbot",
                    feedback_options=None,
                    latex_delimiters=LATEX,
                    editable="user",
                )
                status = gr.Markdown(elem_id="reply-status")  # the last reply's stats, or "Writing…"
                with gr.Row():
                    textbox = words(
                        gr.Textbox,
                        # the label is hidden, but the box's name for screen readers
                        {"label": "Message", "placeholder": "Type a message and press Enter"},
                        show_label=False,
                        scale=8,
                        autofocus=True,
                        elem_id="message",
                    )
                    send = words(
                        gr.Button, {"value": "Send"}, variant="primary", scale=1, min_width=80, elem_id="send"
                    )
                    unsent = gr.Textbox(visible=False, elem_id="unsent")  # a message that failed
                with gr.Row():
                    stop = words(gr.Button, {"value": "Stop"}, variant="stop", elem_id="stop")
                    regenerate = words(gr.Button, {"value": "Regenerate"}, elem_id="regenerate")
                    clear = words(gr.Button, {"value": "Clear"}, elem_id="clear")
            with gr.Column(scale=1, min_width=240):
                system = words(
                    gr.Textbox,
                    {"label": "System prompt", "info": "Empty: the model's own default."},
                    value="",
                    lines=5,
                    elem_id="system",
                )
                temperature = words(
                    gr.Slider,
                    {"label": "Temperature"},
                    minimum=TEMPERATURE[0],
                    maximum=TEMPERATURE[1],
                    value=0.7,
                    step=0.05,
                    elem_id="temperature",
                )
                top_p = gr.Slider(*TOP_P, value=1.0, step=0.01, label="Top-p", elem_id="top-p")
                max_tokens = words(
                    gr.Slider,
                    {
                        "label": "Max new tokens",
                        "info": "Lowered, when need be, to the room the context window leaves.",
                    },
                    minimum=1,
                    maximum=context_window,
                    value=min(512, context_window),
                    step=1,
                    elem_id="max-tokens",
                )

        settings = [system, temperature, top_p, max_tokens, key]
        busy = [send, regenerate]
        # concurrency_limit=None: many browser sessions generate at once; the engine batches them.
        # While a reply is written, Enter does nothing (Gradio's trigger_mode="once"): the next
        # message waits in the box, and Send and Regenerate are disabled until the reply ends.
        # show_progress_on=status: Gradio draws its progress, and after an error its "Error" badge, over
        # the line under the chat alone; over all the outputs, the badge hid the conversation and the box
        # the message was put back in until each was closed.
        sending = gr.on(
            [textbox.submit, send.click],
            ui.respond,
            [textbox, turns, left_out, *settings],
            [textbox, unsent, chatbot, status, turns, left_out, *busy],
            concurrency_limit=None,
            api_name="chat",
            show_progress_on=status,
        )
        sending.failure(None, [unsent, textbox], [textbox, unsent], js=PUT_BACK, api_visibility="private")
        again = regenerate.click(
            ui.regenerate,
            [turns, left_out, *settings],
            [chatbot, status, turns, left_out, *busy],
            concurrency_limit=None,
            api_name="regenerate",
            show_progress_on=status,
        )
        edited = chatbot.edit(
            ui.edit,
            [turns, left_out, *settings],
            [chatbot, status, turns, left_out, *busy],
            concurrency_limit=None,
            api_visibility="private",
            show_progress_on=status,
        )
        chatbot.undo(
            ui.undo, turns, [chatbot, status, turns, unsent], queue=False, api_visibility="private"
        ).then(None, [unsent, textbox], [textbox, unsent], js=PUT_BACK, api_visibility="private")
        if api_keys is not None:  # a reply refused for want of a key the server still has: the key box
            for failed in (sending, again, edited):
                failed.failure(ui.ask_key_again, key, login_box, queue=False, api_visibility="private")
        # Stop lets the reply finish with its stats ("stopped"); Clear also drops what is still streaming.
        stop.click(ui.stop, None, None, queue=False, api_visibility="private")
        # A page closed or reloaded mid-reply: Gradio closes the reply's generator when its next piece comes,
        # which a chat waiting for a batch row has not got: it waited on, taking a place in the queue, and
        # once given a row it computed its prompt for nobody. The page's end stops it as Stop does.
        demo.unload(ui.stop)
        gr.on(  # the Clear button and the chatbot's own trash icon
            [clear.click, chatbot.clear],
            ui.clear,
            None,
            [chatbot, status, turns, textbox, *busy],
            queue=False,
            cancels=[sending, again, edited],
            api_visibility="private",
        )
        # queue=False: answered at once, not after the queue's other events. Queued, under load its answer
        # could come after a message sent as the page appeared, and showed the chat as it was before it.
        demo.load(ui.show, turns, [chatbot, status, *worded], queue=False, api_visibility="private")
        lang = gr.Textbox(visible=False, elem_id="page-language")
        demo.load(ui.page_language, None, lang, queue=False, api_visibility="private").then(
            None,
            lang,
            None,
            js="(lang) => { document.documentElement.lang = lang; }",
            api_visibility="private",
        )
        kept = [system, temperature, top_p, max_tokens]
        demo.load(ui.restore_settings, settings_kept, kept, queue=False, api_visibility="private")
        gr.on(
            [setting.change for setting in kept],
            ui.keep_settings,
            kept,
            settings_kept,
            queue=False,
            show_progress="hidden",
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
