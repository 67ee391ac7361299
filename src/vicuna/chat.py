"""`vicuna chat`: a conversation in the terminal over the engine's event stream.

Interactive on a terminal (plain or rich markdown rendering); when standard input is a pipe, every
line is one user message and every reply is printed on its own, so `echo "..." | vicuna chat` works
in scripts. Commands: !!exit, !!reset, !!remove, !!regen, !!save FILE, !!load FILE.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from vicuna.config import SamplingParams, add_model_arguments, model_settings_from_args
from vicuna.conversation import Message, parse_messages
from vicuna.engine.events import Event, Finished, TextChunk
from vicuna.errors import ContextTooLongError, VicunaError

END_MARK = "__END_OF_MESSAGE__"  # --style programmatic: ends each message in and out
HELP = "Commands: !!exit  !!reset  !!remove  !!regen  !!save FILE  !!load FILE. Ctrl-C stops a reply."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    g = parser.add_argument_group("generation")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--seed", type=int)
    c = parser.add_argument_group("chat")
    c.add_argument("--no-history", action="store_true", help="answer each message on its own")
    c.add_argument("--style", choices=("simple", "rich", "programmatic"), default="simple")
    c.add_argument("--multiline", action="store_true", help="a message ends with an empty line")
    c.add_argument("--debug", action="store_true", help="show time to first token and tokens/s")


class ChatEngine(Protocol):
    context_window: int

    def encode_chat(self, messages: list[Message]) -> list[int]: ...
    def chat(
        self, messages: list[Message], params: SamplingParams, *, cancel: threading.Event | None = None
    ) -> Iterator[Event]: ...


class ChatIO(Protocol):
    def read(self) -> str | None: ...
    def info(self, text: str) -> None: ...
    def show_reply(self, events: Iterator[Event]) -> tuple[str, Finished | None]: ...


class TerminalIO:
    """Reads user messages and shows replies; `rich` renders markdown as it streams."""

    def __init__(self, style: str, multiline: bool, interactive: bool) -> None:
        self.style, self.multiline, self.interactive = style, multiline, interactive
        self.console = None
        if style == "rich":
            from rich.console import Console

            self.console = Console()

    def read(self) -> str | None:
        try:
            if self.style == "programmatic":
                lines = []
                for line in sys.stdin:
                    if line.rstrip("\n") == END_MARK:
                        return "\n".join(lines)
                    lines.append(line.rstrip("\n"))
                return "\n".join(lines) if lines else None
            if not self.interactive:
                line = sys.stdin.readline()
                return line.rstrip("\n") if line else None
            first = input("USER: ")
            if not self.multiline:
                return first
            lines = [first]
            while lines[-1]:
                lines.append(input("...: "))
            return "\n".join(lines).rstrip("\n")
        except EOFError:
            return None

    def info(self, text: str) -> None:
        print(text, file=sys.stderr if not self.interactive else sys.stdout, flush=True)

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
        from rich.markdown import Markdown

        text, done = "", None
        with Live(console=self.console, refresh_per_second=8) as live:
            for event in events:
                if isinstance(event, TextChunk):
                    text += event.text
                    live.update(Markdown(text))
                else:
                    done = event
        return text, done


def fit_history(
    engine: ChatEngine, messages: list[Message], max_new_tokens: int
) -> tuple[list[Message], int]:
    """Drop the oldest exchanges until the prompt and the reply fit the context window."""
    system = [m for m in messages[:1] if m.role == "system"]
    turns = messages[len(system) :]
    dropped = 0
    while len(turns) > 1 and len(engine.encode_chat(system + turns)) + max_new_tokens > engine.context_window:
        turns = turns[2:]
        dropped += 1
    return system + turns, dropped


def run_chat(
    engine: ChatEngine, io: ChatIO, params: SamplingParams, *, history: bool = True, debug: bool = False
) -> None:
    messages: list[Message] = []
    while True:
        text = io.read()
        if text is None or text.strip() == "!!exit":
            return
        command, _, arg = text.strip().partition(" ")
        if command == "!!reset":
            messages = []
            io.info("(conversation cleared)")
            continue
        if command == "!!remove":
            messages = messages[:-2] if len(messages) >= 2 else []
            io.info("(last exchange removed)")
            continue
        if command in ("!!save", "!!load"):
            messages = _save_or_load(command, arg.strip(), messages, io)
            continue
        if command == "!!regen":
            if not messages or messages[-1].role != "assistant":
                io.info("(nothing to regenerate)")
                continue
            messages = messages[:-1]
        elif not text.strip():
            continue
        else:
            if not history:
                messages = []
            messages.append(Message("user", text))
        messages, dropped = fit_history(engine, messages, params.max_new_tokens)
        if dropped:
            io.info(f"(dropped the {dropped} oldest exchange(s) to fit the context window)")
        reply, done = _reply(engine, io, messages, params)
        if reply is None:  # the message alone is too long
            messages.pop()
            continue
        messages.append(Message("assistant", reply))
        if debug and done is not None:
            io.info(
                f"[{done.completion_tokens} tokens, TTFT {done.ttft_s * 1000:.0f} ms, "
                f"{done.decode_tokens_per_s:.1f} tok/s, {done.reason}]"
            )


def _reply(
    engine: ChatEngine, io: ChatIO, messages: list[Message], params: SamplingParams
) -> tuple[str | None, Finished | None]:
    cancel = threading.Event()
    try:
        events = engine.chat(messages, params, cancel=cancel)
    except ContextTooLongError as err:
        io.info(f"error: {err}")
        return None, None
    collected: list[str] = []

    def tee() -> Iterator[Event]:
        for event in events:
            if isinstance(event, TextChunk):
                collected.append(event.text)
            yield event

    try:
        return io.show_reply(tee())
    except KeyboardInterrupt:  # Ctrl-C stops the reply, not the program
        cancel.set()
        io.info("\n(reply stopped)")
        return "".join(collected), None
    except Exception as err:
        import torch

        if not isinstance(err, torch.OutOfMemoryError):  # the engine has given the GPU its memory back
            raise
        io.info(
            "\nerror: out of memory on the GPU while replying; this message goes unanswered. A shorter "
            "conversation (!!reset) needs less, or restart with --load-8bit (half the weights' memory) "
            "or --num-gpus N to spread the model"
        )
        return None, None


def _save_or_load(command: str, arg: str, messages: list[Message], io: ChatIO) -> list[Message]:
    if not arg:
        io.info(f"usage: {command} FILE")
        return messages
    path = Path(arg).expanduser()
    if command == "!!save":
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(
            json.dumps([m.__dict__ for m in messages], ensure_ascii=False, indent=2), encoding="utf-8"
        )
        tmp.replace(path)
        io.info(f"(saved {len(messages)} messages to {path})")
        return messages
    try:
        loaded = parse_messages(json.loads(path.read_text(encoding="utf-8")), source=str(path))
    except (OSError, json.JSONDecodeError, VicunaError) as err:
        io.info(f"error: cannot load {path}: {err}")
        return messages
    io.info(f"(loaded {len(loaded)} messages from {path})")
    return loaded


def main(args: argparse.Namespace) -> int:
    from vicuna.engine.loader import load_engine

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    settings = model_settings_from_args(args)
    engine: Any = load_engine(settings)
    io = TerminalIO(
        args.style, args.multiline, interactive=sys.stdin.isatty() and args.style != "programmatic"
    )
    if io.interactive:
        io.info(HELP)
    run_chat(engine, io, params, history=not args.no_history, debug=args.debug)
    return 0
