"""`vicuna chat`: a conversation in the terminal over the engine's event stream.

Interactive on a terminal (plain or rich markdown rendering); when standard input is a pipe, every
line is one user message (or several lines, as typed) and every reply is printed on its own, so
`echo "..." | vicuna chat` works in scripts. Commands: !!exit, !!reset, !!remove, !!regen, !!save FILE,
!!load FILE, !!help.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import functools
import io as io_module
import json
import math
import os
import re
import signal
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any, Protocol

from vicuna.config import (
    RANDOM_SEED,
    SamplingParams,
    add_model_arguments,
    model_settings_from_args,
    vicuna_home,
)
from vicuna.conversation import Message, check_alternating, fit_history, parse_messages
from vicuna.engine.events import Event, Finished, TextChunk
from vicuna.errors import VicunaError
from vicuna.textfile import read_json
from vicuna.weights.disk import locked, write_atomically

HISTORY_FILE = "chat_history"  # in $VICUNA_HOME: the messages typed, for the up arrow
HISTORY_LINES = 1000
MAX_NEW_TOKENS = 512  # --max-new-tokens not given, where the context window is at least twice as long
CODE_ROWS_EVERY_S = 0.25  # `--style rich`: how often an open code block's rows past the screen are printed
END_MARK = "__END_OF_MESSAGE__"  # --style programmatic: ends each message in and out
FASTCHAT_END_MARK = "__END_OF_A_MESSAGE_47582648__"  # FastChat's, at the end of a line, in only
HELP = (
    "Commands: !!exit  !!reset  !!remove  !!regen  !!save FILE  !!load FILE  !!help. Ctrl-C stops a reply. "
    '""" begins and ends a message of several lines.'
)
COMMANDS = """\
!!exit          end the chat (Ctrl-D at the prompt too)
!!reset         start a new conversation
!!remove        take back the last message and its reply
!!regen         answer the last message again
!!save FILE     write the conversation to FILE (JSON; the system prompt of --conv-system-msg too)
!!load FILE     go on with a conversation !!save wrote (or FastChat's !!save)
!!help          this list
Ctrl-C stops a reply (what it wrote stays: !!regen or !!remove); at the prompt it drops the line typed.
A message of several lines: paste it, or begin it with \"\"\" and end it with \"\"\" (--multiline: an empty line)."""
QUOTES = '"""'  # as in ollama: a line that begins with it begins a message of several lines
PASTED = "Lines pasted at once are one message."  # where readline takes pastes whole (bracketed paste)


def eof_keys() -> str:
    """The keys that end the input at a prompt. Windows' console ends it with Ctrl-Z and Enter; Ctrl-D
    there types ^D, which Enter sent to the model as a message."""
    return "Ctrl-Z then Enter" if sys.platform == "win32" else "Ctrl-D"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    g = parser.add_argument_group("generation")
    g.add_argument("--temperature", type=float, default=0.7, help="0: always the most likely token")
    g.add_argument(
        "--top-p",
        type=float,
        metavar="P",
        default=1.0,
        help="sample from the most likely tokens that add up to P (0: always the most likely token)",
    )
    g.add_argument(
        "--top-k", type=int, default=0, metavar="K", help="sample from the K most likely tokens (0: from all)"
    )
    g.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="above 1: tokens already seen are less likely"
    )
    g.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"longest reply, in tokens (default: {MAX_NEW_TOKENS}, or half the model's context window if less)",
    )
    g.add_argument(
        "--seed", type=int, help="makes sampling repeatable (default: a new seed each run, as -1 is)"
    )
    c = parser.add_argument_group("chat")
    c.add_argument(
        "--no-history",
        action="store_true",
        help="answer each message on its own, without the conversation before it (what you type is still "
        "kept for the up arrow, in $VICUNA_HOME/chat_history)",
    )
    c.add_argument(
        "--style",
        choices=("simple", "rich", "programmatic"),
        default="simple",
        help=f"rich: render markdown as it streams; programmatic: messages in and out end with a {END_MARK} line",
    )
    c.add_argument(
        "--multiline",
        action="store_true",
        help=f"a message ends with an empty line, or {eof_keys()} on a line of its own",
    )
    c.add_argument("--debug", action="store_true", help="show time to first token and tokens/s")


class ChatEngine(Protocol):
    context_window: int

    def encode_chat(self, messages: list[Message]) -> list[int]: ...
    def chat(
        self, messages: list[Message], params: SamplingParams, *, cancel: threading.Event | None = None
    ) -> Iterator[Event]: ...


class ChatIO(Protocol):
    interactive: bool  # someone at a prompt: Ctrl-C stops a reply only (in a pipe it ends the chat)

    def read(self) -> str | None: ...
    def info(self, text: str) -> None: ...
    def show_reply(self, events: Iterator[Event]) -> tuple[str, Finished | None]: ...
    def no_reply(self) -> None: ...


def piped_line(line: str, code_page: str | None = None) -> str:
    """A line read from a file or a pipe, as a Windows editor may have saved it: without its line end
    ("\r\n" too) and without the byte-order mark Notepad puts before the first line of UTF-8, which went to
    the model as part of the first message (and made a first line '!!load FILE' a message). A line that is
    not UTF-8 is read in `code_page` where one is given (`utf8_stdin`)."""
    line = line.rstrip("\r\n").removeprefix("\ufeff")
    if code_page is not None and not line.isascii():
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            line = line.encode("utf-8", "surrogateescape").decode(code_page, "surrogateescape")
    return line


def utf8_stdin() -> str | None:
    """Read standard input as UTF-8, bytes that are not UTF-8 kept as surrogate escapes (said, not a
    traceback); the encoding in which to read a line that is not UTF-8, or None. Python reads a pipe in
    the locale's encoding: on Windows its ANSI code page (cp936 on a Chinese Windows), on Linux that of
    LANG (zh_CN.GBK on older Chinese servers, en_US.ISO-8859-1), but what comes through one is as often
    UTF-8: a file Notepad or any editor of today saved, PowerShell 7, Git Bash. Read as GBK, "你好" went to
    the model as "浣犲ソ" without a word (as "ä½ å¥½" in Latin-1), and Notepad's byte-order mark was never
    taken off. There a line is read as UTF-8 when it is, else in the locale's encoding (cmd's
    `echo 你好 | vicuna chat` sends GBK, as does a file saved in a GBK locale)."""
    if not isinstance(sys.stdin, io_module.TextIOWrapper):
        return None
    encoding = sys.stdin.encoding
    if not sys.stdin.isatty() and codecs.lookup(encoding).name != "utf-8":
        sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")
        return encoding
    sys.stdin.reconfigure(errors="surrogateescape")
    return None


def utf8_locale_for_readline() -> None:
    """GNU readline takes Chinese (any text beyond ASCII) as text only in a UTF-8 locale, which it looks up
    in the environment, LC_ALL first. Under LC_ALL=C, or an LC_ALL naming a locale the system lacks
    (zh_CN.UTF-8 where it was never generated), Python still reads and writes UTF-8 (its UTF-8 mode) but
    readline took the bytes of "你好" for Meta keys: it listed file names, and the message came out empty.
    There readline is given a UTF-8 locale of the same rules (C.UTF-8), as Python gives itself one under
    LANG=C."""
    import locale

    if locale.setlocale(locale.LC_CTYPE) not in ("C", "POSIX") or sys.stdin.encoding.lower() != "utf-8":
        return
    for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
        except locale.Error:
            continue
        os.environ["LC_ALL" if os.environ.get("LC_ALL") else "LC_CTYPE"] = name
        return


def draws_bracketed_paste() -> bool:
    """Whether readline can take a paste whole here. It asks the terminal to mark pastes with an escape
    sequence before each prompt, which a dumb terminal (TERM=dumb, as in Emacs' M-x shell, or no TERM:
    readline's own rule, by which it turns the mode off there) shows as "^[[?2004h" before every "USER: ",
    and a screen reader reads out. Python's input() reads through readline only when standard output is
    a terminal too: under `vicuna chat | tee chat.log` the chat said that pasted lines are one message,
    which they were not, and Ctrl-D left the shell's prompt after "USER: "."""
    return os.environ.get("TERM", "dumb") != "dumb" and sys.stdout.isatty()


def history_line(entry: str) -> str:
    """A typed message as a line of the history file. readline's own file keeps a message of several lines
    (pasted, or typed with --multiline) as so many lines, and the next chat's up arrow recalled only its
    last line; here each line of it but the last ends with a carriage return, which a typed line has not."""
    return entry.replace("\n", "\r\n") + "\n"


LIBEDIT_HISTORY = "_HiStOrY_V2_"  # the first line of a history file that libedit's readline wrote


def history_entries(text: str) -> list[str]:
    """The messages of a history file that `history_line` wrote (or readline: a line each). Versions before
    wrote it with readline's own `write_history_file`, which on macOS (libedit) begins with a header line
    and escapes bytes as vis(3) does (a space as \\040, a line break as \\^J, a byte of a character beyond
    ASCII as \\M-d): read as lines, the up arrow recalled the header and "hello\\040world"."""
    entries = [entry.replace("\r\n", "\n") for entry in re.split(r"(?<!\r)\n", text) if entry]
    if entries[:1] != [LIBEDIT_HISTORY]:
        return entries

    def byte(m: re.Match[bytes]) -> bytes:
        code, meta = m[1], 0
        if code[:1] == b"M":  # \M-c: c with its top bit set; \M^c: a control character's
            code, meta = code[1:].removeprefix(b"-"), 0x80
        if code[:1] == b"^":  # \^J: a control character, \^? DEL
            return bytes([(code[1] ^ 0x40) & 0x7F | meta])
        return bytes([int(code, 8) & 0xFF]) if code[:1].isdigit() else bytes([code[0] | meta])

    escape = re.compile(rb"\\([0-7]{3}|\^.|M-.|M\^.|\\)", re.DOTALL)
    raw = (escape.sub(byte, e.encode("utf-8", "surrogateescape")) for e in entries[1:])
    return [entry.decode("utf-8", "surrogateescape") for entry in raw]


class TerminalIO:
    """Reads user messages and shows replies; `rich` renders markdown as it streams."""

    def __init__(self, style: str, multiline: bool, interactive: bool, code_page: str | None = None) -> None:
        self.style, self.multiline, self.interactive = style, multiline, interactive
        self.code_page = code_page  # of a piped line that is not UTF-8 (`utf8_stdin`)
        self.console = None
        if interactive:
            # input() through GNU readline: line editing, and no limit on a line's length, where the
            # terminal itself keeps 4095 bytes of a line (1365 Chinese characters) and drops the rest
            with contextlib.suppress(ImportError):  # a Python built without it reads as the terminal gives
                utf8_locale_for_readline()
                import readline

                # Windows' Python has none: a `readline` there is pyreadline3's, which edits the line but
                # lacks set_auto_history (the chat ended with an AttributeError before its first prompt)
                # and raises IndexError for the history item 0 of an empty history; it is left to itself
                if not hasattr(readline, "set_auto_history"):
                    raise ImportError
                if "libedit" not in (readline.__doc__ or "") and draws_bracketed_paste():
                    # text pasted at once is one message, newlines and all, sent by the Enter after it
                    # (Python turns it off; bash has it on)
                    readline.parse_and_bind("set enable-bracketed-paste on")
                    self.bracketed_paste = True
                # what was typed, for the up arrow in later chats too (as Python's own ~/.python_history)
                with contextlib.suppress(VicunaError):  # no home folder: a chat without the saved history
                    self.history = vicuna_home() / HISTORY_FILE
                # a message is one entry, added by read(): readline's own adds each line of --multiline's
                readline.set_auto_history(False)
                self.readline = readline
                with contextlib.suppress(OSError):
                    for entry in self.saved_history()[-HISTORY_LINES:]:
                        readline.add_history(entry)
        if style == "rich":
            from rich.console import Console

            self.console = Console()
            # where the live view cannot redraw, a reply showed only at its end: on a dumb terminal, and
            # under `vicuna chat --style rich | tee chat.log`, where the next "USER: " followed its last row
            if not self.console.is_interactive:
                where = (
                    "this terminal (TERM=dumb)"
                    if self.console.is_terminal
                    else "output that is not a terminal"
                )
                print(f"notice: {where} cannot redraw a reply: --style simple", file=sys.stderr)
                self.style, self.console = "simple", None

    history: Path | None = None
    bracketed_paste = False
    read_any = False  # whether a message (an empty line too) or a command was read
    readline: Any = None  # the module, where the terminal is read through it

    def remember(self, text: str) -> None:
        """A message typed, for the up arrow: once, as a whole, and in the file at once."""
        readline = self.readline
        if readline is None or not text.strip():
            return
        if text != readline.get_history_item(readline.get_current_history_length()):
            readline.add_history(text)
        # as many as the file keeps: readline's own list grew by every message of a chat left open
        # (its set_history_length bounds only the files it writes itself)
        while readline.get_current_history_length() > HISTORY_LINES:
            readline.remove_history_item(0)
        self.save_history(text)

    def saved_history(self) -> list[str]:
        if self.history is None:
            return []
        with open(self.history, encoding="utf-8", errors="surrogateescape", newline="") as f:
            return history_entries(f.read())

    def save_history(self, text: str) -> None:
        """Add a message typed to the file (readable by its owner only); a failure costs only that. Added
        at once, as a chat ended by closing its terminal (SIGHUP) never reaches its end; and to what the
        file holds now, not what this chat read at its start: of two chats at once, the one that wrote
        last had left in the file none of what was typed in the other. Nothing is kept where the file is a
        link to /dev/null (`ln -sf /dev/null $VICUNA_HOME/chat_history`, as for bash's or Python's history):
        the file renamed over the link kept every message from then on. Read and written under a lock (a
        hidden file beside it, kept): of two chats saving at the same instant, one lost the other's message."""
        if self.history is None:
            return
        from vicuna.weights.disk import write_atomically

        path = self.history.resolve()  # a link's file: the link stays
        try:
            if path.exists() and not path.is_file():
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(path.with_name(f".{path.name}.lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError as err:
            self.unsaved(path, err)
            return
        with open(lock, "w") as handle:
            with contextlib.suppress(OSError):  # a share that keeps no locks (NFS's ENOLCK): saved unlocked
                locked(handle)  # let go as it closes
            try:
                entries = self.saved_history()
            except FileNotFoundError:
                entries = []
            except OSError as err:
                self.unsaved(path, err)
                return
            entries = [*entries, text] if entries[-1:] != [text] else entries
            lines = "".join(history_line(entry) for entry in entries[-HISTORY_LINES:])
            try:
                write_atomically(path, lines.encode("utf-8", "surrogateescape"), mode=0o600)
            except OSError as err:
                self.unsaved(path, err)

    def unsaved(self, path: Path, err: OSError) -> None:
        """Say, once a chat, that what is typed is not saved: a read-only or full $VICUNA_HOME (a container's,
        a shared one) lost every message for the next chat's up arrow without a word."""
        if self.history is not None:
            self.info(
                f"notice: the messages typed are not saved in {path} ({err.strerror or err}); the up arrow "
                "has them in this chat only"
            )
        self.history = None

    def read(self) -> str | None:
        text = self._read()
        self.read_any = self.read_any or text is not None
        return text

    def _read(self) -> str | None:
        try:
            if self.style == "programmatic":
                lines = []
                for line in sys.stdin:
                    line = piped_line(line, self.code_page)
                    if line == END_MARK:
                        return "\n".join(lines)
                    if line.endswith(FASTCHAT_END_MARK):  # its messages went on, and its script waited
                        raise VicunaError(
                            f"--style programmatic: {FASTCHAT_END_MARK} is FastChat's end of a message; here "
                            f"a message ends with a line {END_MARK}, and so does each reply (no [!OP:...] prefixes)"
                        )
                    lines.append(line)
                return "\n".join(lines) if lines else None
            if not self.interactive:  # a message as typed, without prompts: a here-doc written with
                # """ or for FastChat's --multiline had each of its lines answered on its own
                return self._read_message(self._piped_line)
            while True:
                try:
                    text = self._read_message(input)
                    self.remember(text)
                    return text
                except KeyboardInterrupt:  # as in a shell: the line typed so far goes, the chat stays
                    print(f"\n({eof_keys()} or !!exit ends the chat)", flush=True)
        except EOFError:  # Ctrl-D (Ctrl-Z and Enter on Windows)
            if self.interactive and not self.bracketed_paste:  # readline ends the line itself in that mode
                print(flush=True)  # the shell's prompt on a line of its own, not after "USER: "
            return None

    def _piped_line(self, prompt: str) -> str:
        """The next line piped in, as input() reads one typed (EOFError at the end); no prompt."""
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return piped_line(line, self.code_page)

    def _read_message(self, read_line: Callable[[str], str]) -> str:
        """A message read a line at a time by `read_line(prompt)`: typed at the prompt, or piped in."""
        first = read_line("USER: ").rstrip("\r")
        quoted = first.startswith(QUOTES) and "\n" not in first  # typed: a paste may open with a docstring
        if quoted:  # ollama's way to type a message of several lines: up to a line that ends with """
            lines, ends = [first.removeprefix(QUOTES)], lambda line: line.endswith(QUOTES)
        elif self.multiline:
            lines, ends = [first], lambda line: not line
        else:
            return first
        while not ends(lines[-1]):
            try:
                lines.append(read_line("...: ").rstrip("\r"))
            except EOFError:  # FastChat's --multiline ends a message so: the message, not the chat, ends
                # on the screen on a line of its own; in bracketed-paste mode readline ends the line itself
                if self.interactive and not self.bracketed_paste:
                    print(flush=True)
                break
        text = "\n".join(lines)
        return text.removesuffix(QUOTES).strip("\n") if quoted else text.rstrip("\n")

    def info(self, text: str) -> None:
        print(text, file=sys.stderr if not self.interactive else sys.stdout, flush=True)

    def no_reply(self) -> None:
        """A message that goes unanswered (a note says why). With --style programmatic, an empty reply: the
        script that sent the message waits for one, and waited for ever for a message too long, or empty."""
        if self.style == "programmatic":
            print(END_MARK, flush=True)

    def show_reply(self, events: Iterator[Event]) -> tuple[str, Finished | None]:
        """Print a reply as it streams; returns its text and its Finished event (None if interrupted)."""
        if self.console is not None and self.interactive:
            return self._show_rich(events)
        prefix = "ASSISTANT: " if self.interactive else ""
        print(prefix, end="", flush=True)
        text, done = "", None
        try:
            for event in events:
                if isinstance(event, TextChunk):
                    text += event.text
                    print(event.text, end="", flush=True)
                else:
                    done = event
        finally:
            print(flush=True)
            if self.style == "programmatic":
                print(END_MARK, flush=True)
        return text, done

    def _show_rich(self, events: Iterator[Event]) -> tuple[str, Finished | None]:
        from rich.live import Live

        # Live redraws only what fits on the screen (a longer reply stops at "..." until it ends), so the
        # blocks that are done are printed for good above it and Live redraws the block still streaming;
        # of a code block taller than the screen, the rows that go past its top are printed for good too
        # (a render of the whole block, every CODE_ROWS_EVERY_S at most: rendering a 150-line block takes
        # ~40 ms, which a reply waits for, and a long block's rows would otherwise be rendered per line)
        console, text, done = self.console, "", None
        printed, shown = 0, 0  # text[:printed] is printed for good, and the first `shown` rows of the rest
        rendered = -math.inf  # when the open code block's rows were last rendered
        drawn = -math.inf  # when Live last redrew the block still streaming
        # whose turn it is, as the plain style's "ASSISTANT: " says it (and FastChat's rich style): a screen
        # reader or a braille display told the reply from the "USER: " line above it by its look alone
        console.print("ASSISTANT:", style="bold", markup=False, highlight=False)
        # Live redraws here, at most 8 times a second, not from its own thread: that thread may redraw
        # between a print's cursor move and its write, and the print then erases rows printed for good
        with Live(console=console, auto_refresh=False) as live:
            for event in events:
                if not isinstance(event, TextChunk):
                    done = event
                    continue
                text += event.text
                end, out = finished_blocks(text), []
                if end > printed:  # and a blank line after it
                    out = [*markdown_rows(console, text[printed:end])[shown:], []]
                    printed, shown = end, 0
                streaming: Any = MarkdownBlock(text[printed:], shown)  # what Live draws: rendered when drawn
                due = time.monotonic() - rendered >= CODE_ROWS_EVERY_S
                if due and "\n" in event.text and in_code_block(text[printed:]):  # its rows do not reflow
                    rendered = time.monotonic()
                    rows = markdown_rows(console, text[printed:])
                    # past Live's room: none while the block fits (an end below 0 would count from
                    # its last row, the line still being written among them)
                    past = max(shown, len(rows) - max(1, console.height - 1))
                    out, shown = out + rows[shown:past], past
                    streaming = Rows(rows[past:])  # rendered already: not again when Live draws it
                live.update(streaming)  # before the print that redraws it
                if out:
                    live.console.print(Rows(out))
                elif time.monotonic() - drawn >= 1 / 8:
                    live.refresh()
                else:
                    continue
                drawn = time.monotonic()
        return text, done


def markdown_rows(console: Any, text: str, options: Any = None) -> list[Any]:
    """Markdown as rich renders it, less the blank lines it puts before a list or a table: printed apart,
    blocks are kept one blank line apart by the chat."""
    from rich.markdown import Markdown
    from rich.segment import Segment

    markdown = Markdown("")
    markdown.markup, markdown.parsed = text, cjk_markdown_parser().parse(text)
    rows = console.render_lines(markdown, options, pad=False)
    while rows and not Segment.get_line_length(rows[0]):
        rows.pop(0)
    return rows


@functools.cache
def cjk_markdown_parser() -> Any:
    """rich's markdown parser, where `**bold**` and `*italic*` work beside Chinese text and punctuation as
    beside English words. CommonMark does not close `**注意：**这是…` (its end follows punctuation and
    precedes a letter), which Chinese replies write all the time: the asterisks were shown and nothing was
    bold. Here a `*` run with a wide (CJK) character on either side opens or closes as one between two
    letters does, unless white space is beside it."""
    from markdown_it import MarkdownIt
    from markdown_it.common.utils import isWhiteSpace
    from markdown_it.rules_inline import emphasis

    def tokenize(state: Any, silent: bool) -> bool:
        first = len(state.delimiters)
        if not emphasis.tokenize(state, silent):
            return False
        start = state.pos - (len(state.delimiters) - first)
        before = state.src[start - 1] if start > 0 else " "
        after = state.src[state.pos] if state.pos < state.posMax else " "
        if state.src[start] == "*" and any(
            unicodedata.east_asian_width(c) in ("W", "F") for c in before + after
        ):
            for delimiter in state.delimiters[first:]:  # punctuation beside it no longer matters
                delimiter.open, delimiter.close = not isWhiteSpace(ord(after)), not isWhiteSpace(ord(before))
        return True

    parser = MarkdownIt().enable("strikethrough").enable("table")  # as rich.markdown.Markdown's own
    parser.inline.ruler.at("emphasis", tokenize)
    return parser


class Rows:
    """Rows rendered already (lists of rich segments), drawn as they are."""

    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def __rich_console__(self, console: Any, options: Any) -> Iterator[Any]:
        from rich.segment import Segment

        for row in self.rows:
            yield from row
            yield Segment.line()


class MarkdownBlock:
    """The rows of markdown_rows past the first `skip`, rendered each time Live redraws them."""

    def __init__(self, text: str, skip: int = 0) -> None:
        self.text, self.skip = text, skip

    def __rich_console__(self, console: Any, options: Any) -> Iterator[Any]:
        yield Rows(markdown_rows(console, self.text, options)[self.skip :])


def finished_blocks(text: str) -> int:
    """How much of a markdown text is whole blocks: up to its last blank line outside a code block."""
    end, fenced, at = 0, False, 0
    lines = text.splitlines(keepends=True)
    for line, after in pairwise(lines):  # a line with one after it begun
        at += len(line)
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and not line.strip() and not after[0].isspace():  # not an indented part of a list
            end = at
    return end


def in_code_block(text: str) -> bool:
    """Whether a markdown text ends inside a fenced code block."""
    return sum(line.lstrip().startswith(("```", "~~~")) for line in text.splitlines()) % 2 == 1


def run_chat(
    engine: ChatEngine,
    io: ChatIO,
    params: SamplingParams,
    *,
    history: bool = True,
    debug: bool = False,
    system: str | None = None,
) -> int:
    """Read messages and commands until !!exit or the end of input. A message that cannot be answered
    (an error the user can fix: too long, a template that refuses it) is said so and left unanswered;
    the conversation goes on as it was before it. `system` is the system prompt of --conv-system-msg,
    which the engine's template holds: !!save writes it with a conversation that has none of its own, so
    that !!load in a chat started without the flag (as FastChat's does) still has it. Returns how many
    messages went unanswered and commands failed: `vicuna chat < questions.txt` then exits non-zero."""
    messages: list[Message] = []
    left_out = 0  # the oldest exchanges the last prompt left out: later ones too (`fit_history`)
    failed = 0
    while True:
        text = io.read()
        if text is None:
            return failed
        command, arg = split_command(text)
        if command == "!!exit":
            return failed
        if command == "!!reset":
            messages, left_out = [], 0
            io.info("(conversation cleared)")
            continue
        if command == "!!remove":
            kept = without_last_exchange(messages)
            io.info("(last exchange removed)" if kept != messages else "(nothing to remove)")
            messages = kept
            continue
        if command == "!!save":
            failed += not _save(file_argument(arg), messages, io, system)
            continue
        if command == "!!load":
            if loaded := _load(file_argument(arg), engine, io):
                messages, left_out = loaded, 0
            failed += not loaded
            continue
        fix = "shorten it"  # what a message too long for the context window is refused with
        if command == "!!regen":  # answers the last user message again (or a loaded one for the first time)
            asked = messages[:-1] if messages and messages[-1].role == "assistant" else messages
            if not asked or asked[-1].role != "user":
                io.info("(nothing to regenerate)")
                failed += 1
                continue
            fix = "!!remove drops it"  # a loaded one: what was answered once fits again
        # a typo (!!exti) is not a message, nor is LitGPT's chat's way out (!quit, !exit): it went to the model
        elif (command.startswith("!!") and command[2:].isalpha()) or text.strip().lower() in (
            "!quit",
            "!exit",
        ):
            help_text = COMMANDS.replace("Ctrl-D", eof_keys())
            io.info(help_text if command == "!!help" else f"unknown command {command}. {HELP}")
            failed += command != "!!help"
            continue
        elif not text.strip():
            io.no_reply()
            continue
        elif problem := not_utf8(text):
            io.info(f"error: {problem}; this message goes unanswered")
            io.no_reply()
            failed += 1
            continue
        else:
            asked = with_user_message(messages if history else [], text)
            if history and messages and messages[-1].role == "user":  # shortened, it is still refused
                fix = (
                    "it joins the unanswered message that ends the loaded conversation, which !!remove drops"
                )
        try:
            answered, left_out = _answer(engine, io, asked, params, debug, left_out, fix)
            messages = answered or messages
            failed += answered is None  # out of memory, or (at a prompt) stopped before its first word
        except VicunaError as err:
            io.info(f"error: {err}; this message goes unanswered")
            io.no_reply()
            failed += 1


def split_command(text: str) -> tuple[str, str]:
    """A line's first word and the rest. A Chinese input method types "！！" for "!!" (and, in full-width
    mode, "ｅｘｉｔ" and U+3000 for a space): "！！exit" is the command, not a message that leaves no way
    to exit. Their compatibility forms (NFKC) are the ASCII ones."""
    command, arg = [*text.split(maxsplit=1), "", ""][:2]
    typed = unicodedata.normalize("NFKC", command)
    if typed.startswith("!!") and typed.isascii():
        command = typed
    return command, arg


def file_argument(arg: str) -> str:
    """The FILE of !!save FILE and !!load FILE, without the double quotes around it that a shell's habit
    types, or Windows Explorer's "Copy as path" puts around what it copies: they were taken as part of the
    name ("no such file", or on Linux a file named with them)."""
    arg = arg.strip()
    return arg[1:-1] if len(arg) > 1 and arg[0] == arg[-1] and arg[0] in "\"'" else arg


def not_utf8(text: str) -> str | None:
    """What is wrong with a message read from bytes that are not UTF-8 (kept as surrogate escapes: a GBK
    file piped in, a terminal set to GBK), which no tokenizer takes; None for a message that is text."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    what = "the message is not UTF-8 text"
    try:
        text.encode("utf-8", "surrogateescape").decode("gb18030")
    except UnicodeError:
        return f"{what}: set the terminal to UTF-8, or convert what is piped in to UTF-8"
    return (
        f"{what}; it reads as GBK: set the terminal to UTF-8, or convert what is piped in with "
        "`iconv -f GB18030 -t UTF-8`"
    )


def without_last_exchange(messages: list[Message]) -> list[Message]:
    """The conversation without its last user message and the reply to it."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    return messages[: users[-1]] if users else messages


def with_user_message(messages: list[Message], text: str) -> list[Message]:
    """The conversation with the user's next message; one that follows a user message no reply was
    asked for (the end of a loaded conversation) joins it, so that turns keep alternating."""
    if messages and messages[-1].role == "user":
        return [*messages[:-1], Message("user", f"{messages[-1].content}\n\n{text}")]
    return [*messages, Message("user", text)]


def _answer(
    engine: ChatEngine,
    io: ChatIO,
    messages: list[Message],
    params: SamplingParams,
    debug: bool,
    left_out: int,
    fix: str,
) -> tuple[list[Message] | None, int]:
    """The conversation with a reply to its last message (None if there is no reply), and how many of its
    oldest exchanges the prompt left out (`left_out` or more: those that do not fit, see `fit_history`),
    also where there is no reply: the note on them was said, and the next prompt leaves them out too.
    The conversation (what !!save writes) keeps the exchanges left out. `fix`: what the user can do about
    a last message that leaves no room for a reply."""
    prompt, dropped, room = fit_history(
        engine.encode_chat, engine.context_window, messages, params.max_new_tokens, left_out
    )
    if room < 1:  # refused before the note on exchanges left out, which no prompt left out
        raise VicunaError(
            f"the message makes a prompt of {engine.context_window - room} tokens, which leaves no room "
            f"for a reply in the model's context window of {engine.context_window} tokens: {fix}"
        )
    if dropped > left_out:  # said when more go, not again before every reply of a long conversation
        io.info(f"(the {dropped} oldest exchange(s) left out of the prompt to fit the context window)")
    if room < params.max_new_tokens:
        io.info(
            f"(the message leaves room in the context window for a reply of {room} tokens, "
            f"not --max-new-tokens {params.max_new_tokens})"
        )
        params = replace(params, max_new_tokens=room)
    reply, done = _reply(engine, io, prompt, params)
    if reply is None:
        return None, dropped
    if debug and done is not None:
        io.info(
            f"[{done.completion_tokens} tokens, TTFT {done.ttft_s * 1000:.0f} ms, "
            f"{done.decode_tokens_per_s:.1f} tok/s, {done.reason}]"
        )
    return [*messages, Message("assistant", reply.strip())], dropped


def _reply(
    engine: ChatEngine, io: ChatIO, messages: list[Message], params: SamplingParams
) -> tuple[str | None, Finished | None]:
    cancel = threading.Event()
    events = engine.chat(messages, params, cancel=cancel)
    collected: list[str] = []

    def tee() -> Iterator[Event]:
        for event in trimmed(events):
            if isinstance(event, TextChunk):
                collected.append(event.text)
            yield event

    # In a pipe (`vicuna chat < questions.txt`) there is no prompt to come back to: Ctrl-C, taken for a
    # reply's, only moved the chat on to the next message, however often it was pressed; it ends the chat
    try:
        with ctrl_c_cancels(cancel) if io.interactive else contextlib.nullcontext():
            text, done = io.show_reply(tee())
        if not cancel.is_set():
            return text, done
    except KeyboardInterrupt:  # a second Ctrl-C, for an engine that does not stop: the reply ends here
        if not io.interactive:
            raise
        cancel.set()
        text = "".join(collected)
    except Exception as err:
        from vicuna.engine.memory import out_of_memory

        if not out_of_memory(err):  # the engine has given the GPU its memory back
            raise
        io.info(
            "\nerror: out of memory on the GPU while replying; this message goes unanswered. A shorter "
            "conversation (!!reset) needs less, or restart with --load-8bit (half the weights' memory) "
            "or --num-gpus N to spread the model"
        )
        return None, None
    if not text.strip():  # kept, an empty reply went to the model with each later prompt, or took the
        # place of the reply that !!regen was to replace
        io.info("\n(reply stopped before it began; the conversation is as it was before the message)")
        return None, None
    io.info(
        "\n(reply stopped; what it wrote stays in the conversation: !!regen answers again, "
        "!!remove drops the exchange)"
    )
    return text, None


@contextlib.contextmanager
def ctrl_c_cancels(cancel: threading.Event) -> Iterator[None]:
    """While a reply streams, Ctrl-C sets `cancel`: the engine ends the reply at its next token and keeps
    the cache of the conversation so far. As a KeyboardInterrupt it was raised wherever the main thread
    was, most often inside the engine's step, which then ended with no cache to hand back: the next
    message's prompt, the whole conversation, was computed again from its first token (minutes, for a
    long one on the CPU). A second Ctrl-C raises as before, for an engine that does not stop."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # ignored (nohup), or the caller's
    ):
        yield
        return

    def on_ctrl_c(signum: int, frame: Any) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def trimmed(events: Iterator[Event]) -> Iterator[Event]:
    """A reply's events without whitespace at its start or end, as FastChat strips a reply: models with
    byte-level BPE tokenizers (SmolLM2) begin a reply after "ASSISTANT:" with a space, which stored
    would double the space in the next prompt. Whitespace is held back until text follows it."""
    held: str | None = None  # whitespace not passed on yet; None before the reply's first text
    for event in events:
        if isinstance(event, TextChunk):
            text = event.text.lstrip() if held is None else held + event.text
            shown = text.rstrip()
            if not shown:
                held = None if held is None else text
                continue
            held = text[len(shown) :]
            event = replace(event, text=shown)
        yield event


def _save(arg: str, messages: list[Message], io: ChatIO, system: str | None = None) -> bool:
    """Whether the conversation was saved (if not, said why)."""
    if not arg:
        io.info("usage: !!save FILE")
        return False
    if not messages:  # a file of no messages, which !!load refuses
        io.info("(nothing to save yet: the conversation is empty)")
        return False
    if system is not None and not (messages and messages[0].role == "system"):
        messages = [Message("system", system), *messages]
    path = Path(arg).expanduser()
    try:
        text = json.dumps([m.__dict__ for m in messages], ensure_ascii=False, indent=2)
        # readable by its owner only, as the messages typed are in chat_history (one written over keeps its own)
        write_atomically(path, text, mode=0o600)
    except OSError as err:  # a missing folder, a denied permission: the chat goes on, nothing lost
        io.info(f"error: cannot save to {path}: {err.strerror or err}; the conversation is unchanged")
        return False
    io.info(f"(saved {len(messages)} messages to {path})")
    return True


def _load(arg: str, engine: ChatEngine, io: ChatIO) -> list[Message] | None:
    """A saved conversation, checked as the chat will use it; None (said why) if it cannot be used."""
    if not arg:
        io.info("usage: !!load FILE")
        return None
    path = Path(arg).expanduser()
    try:
        loaded = parse_messages(from_fastchat(read_json(path)), source=str(path))
        check_alternating(loaded, source=str(path))
        # the next prompt: the conversation and a message to reply to (the loaded one, or one to come)
        engine.encode_chat(loaded if loaded[-1].role == "user" else [*loaded, Message("user", "")])
    except (OSError, ValueError, VicunaError) as err:
        why = str(err).removeprefix(f"{path}: ")  # said once
        io.info(f"error: cannot load {path}: {why}; the conversation is unchanged")
        return None
    io.info(f"(loaded {len(loaded)} messages from {path})")
    if loaded[-1].role == "user":
        io.info("(its last message has no reply yet: !!regen answers it; a new message is added to it)")
    return loaded


def from_fastchat(data: Any) -> Any:
    """A conversation as FastChat's `!!save` writes it (its template's fields: the system prompt, the two
    role names, and the turns as [role name, text] pairs, those before `offset` the template's examples)
    as the messages that vicuna's writes; anything else as it is. A user of FastChat's chat had their
    saved conversations refused as "expected a non-empty JSON list of messages"."""
    if not isinstance(data, dict) or not isinstance(roles := data.get("roles"), list) or len(roles) != 2:
        return data
    turns, offset = data.get("messages"), data.get("offset", 0)
    if not isinstance(turns, list) or not isinstance(offset, int):
        return data
    role = dict(zip(roles, ("user", "assistant"), strict=True))
    system = data.get("system_message", data.get("system"))  # "system" in files of before mid-2023
    messages = [{"role": "system", "content": system}] if system else []  # FastChat's "": no system prompt
    for turn in turns[offset:]:
        if not (isinstance(turn, list) and len(turn) == 2):
            return data
        if turn[1] is not None:  # the reply FastChat had not written yet
            messages.append({"role": role.get(turn[0], turn[0]), "content": turn[1]})
    return messages


def reply_budget(max_new_tokens: int | None, context_window: int) -> int:
    """--max-new-tokens, which must leave room in the context window for the conversation; not given,
    MAX_NEW_TOKENS, or half the window of a model whose window is shorter than twice that (a plain `vicuna
    chat` of a model with a 256-token window was refused a --max-new-tokens the user never typed)."""
    default = min(MAX_NEW_TOKENS, context_window // 2)
    if max_new_tokens is None:
        return default
    if max_new_tokens >= context_window:
        raise VicunaError(
            f"--max-new-tokens {max_new_tokens} does not fit this model's context window of "
            f"{context_window} tokens, which holds the conversation and the reply; use less than "
            f"{context_window} (or leave it out: {default} for this model)"
        )
    return max_new_tokens


def check_sampling_flags(args: argparse.Namespace) -> None:
    """Refuse a sampling flag out of range, naming the flag and the value typed. SamplingParams' own
    messages name the API's fields ("temperature must be >= 0"), and gave nan, which fails every range,
    the same message as -1; inf passed, to draw every token alike (or from nan beside top-k or top-p)."""
    checks = [
        ("--temperature", args.temperature, args.temperature >= 0, "at least 0"),
        ("--top-p", args.top_p, 0 <= args.top_p <= 1, "at least 0 and at most 1"),
        ("--top-k", args.top_k, args.top_k >= 0, "at least 0"),
        ("--repetition-penalty", args.repetition_penalty, args.repetition_penalty > 0, "more than 0"),
    ]
    if args.max_new_tokens is not None:  # 0: no reply
        checks.append(("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "at least 1"))
    for flag, value, ok, rule in checks:
        if math.isnan(value):
            raise VicunaError(f"{flag} must be a number, not nan")
        if math.isinf(value):
            raise VicunaError(f"{flag} must be a finite number, not {value}")
        if not ok:
            raise VicunaError(f"{flag} must be {rule}, not {value:g}")


def main(args: argparse.Namespace) -> int:
    from vicuna.engine.engine import context_window
    from vicuna.engine.loader import load_engine, read_config, resolve_model_path
    from vicuna.engine.placement import resolve_device

    check_sampling_flags(args)
    if sys.stdin is None:  # started with it closed (`<&-`): after loading, a traceback on sys.stdin.isatty
        raise VicunaError(
            "standard input is closed: the chat reads its messages there (run it on a terminal, or pipe "
            "the messages in)"
        )
    greedy = args.top_p == 0  # as the API takes it: the smallest nucleus is the most likely token
    params = SamplingParams(
        temperature=0.0 if greedy else args.temperature,
        top_p=1.0 if greedy else args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=None if args.seed == RANDOM_SEED else args.seed,
    )
    settings = model_settings_from_args(args)
    resolve_device(settings)  # flags that need no model are said before it is converted or read
    # refused before minutes of loading: the config says how long the context is
    window = context_window(read_config(resolve_model_path(args.model_path)))
    params = replace(params, max_new_tokens=reply_budget(args.max_new_tokens, window))
    engine: Any = load_engine(settings)
    code_page = utf8_stdin()
    io = TerminalIO(
        args.style,
        args.multiline,
        interactive=sys.stdin.isatty() and args.style != "programmatic",
        code_page=code_page,
    )
    if io.interactive:
        io.info(f"{HELP} {PASTED}" if io.bracketed_paste else HELP)
    failed = run_chat(
        engine, io, params, history=not args.no_history, debug=args.debug, system=args.conv_system_msg
    )
    if not io.read_any and not sys.stdin.isatty():  # `docker run` without -it: it ended without a word
        print(
            "notice: no message: standard input ended before the first one (to chat, run it on a terminal, "
            "e.g. `docker run -it`, or pipe the messages in)",
            file=sys.stderr,
        )
    # in a pipe, a message left unanswered (said on stderr) fails the command, after the others are answered;
    # at a prompt the person saw each one
    return 1 if failed and not io.interactive else 0
