"""The `vicuna` command: maps each subcommand to a module that is imported only when it runs."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import io
import os
import re
import signal
import sys
import textwrap
import threading
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

from vicuna import __version__

# name -> (module, one-line help). Each module has add_arguments(parser) and main(args) -> int | None.
COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("vicuna.chat", "chat with a model in the terminal"),
    "serve": ("vicuna.server", "serve an OpenAI-compatible API and a web UI"),
    "doctor": ("vicuna.doctor", "show the hardware, the model's memory needs and which flags fit"),
    "template": ("vicuna.conversation", "list prompt templates or render one"),
    "download": ("vicuna.weights.hub", "download a Hugging Face Hub repository (resumable)"),
    "download-llama": ("vicuna.weights.meta_download", "download Meta's original LLaMA checkpoint"),
    "convert": ("vicuna.weights.convert", "convert a Meta LLaMA checkpoint to Hugging Face format"),
    "delta": ("vicuna.weights.delta", "make or apply Vicuna delta weights"),
    "verify": ("vicuna.weights.manifest", "check a folder against its sha256 manifest"),
    "get": ("vicuna.weights.get", "download, merge and verify a Vicuna model in one step"),
    "train": ("vicuna.train.cli", "fine-tune on your own conversations"),
    "lora": ("vicuna.train.lora", "merge a LoRA adapter into its base model"),
    "bench": ("vicuna.bench", "measure latency, throughput and memory"),
}

# What to do after Ctrl-C, for the commands that keep their finished work.
RESUME_HINTS = {
    name: "run the same command again to go on from where it stopped"
    for name in ("download", "download-llama", "convert", "delta", "get")
}  # train says its own (vicuna.train.cli): whether there is a checkpoint to resume from


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vicuna",
        description="Run, serve and fine-tune Vicuna and other LLaMA-family chat models.",
        epilog="Start with `vicuna chat`; see `vicuna COMMAND --help` for a command's flags.",
        formatter_class=HelpWithDefaults,
    )
    parser.add_argument("--version", action="version", version=f"vicuna {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


class HelpWithDefaults(argparse.HelpFormatter):
    """Ends a flag's help with its default, unless the help already says it or there is none to say.
    Lines are wrapped at spaces only: argparse also broke them after a hyphen, so a path, a model or a
    flag was cut in two (`$VICUNA_HOME/models/OWNER--` above `NAME`, `SmolLM2-135M-` above `Instruct`),
    and a word longer than the column is left whole, to be copied as it is."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, max(width, 1), break_on_hyphens=False, break_long_words=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line for line in self._split_lines(text, width - len(indent)))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or any(action.default is none for none in (None, False, argparse.SUPPRESS))  # not 0: a default
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """A command's parser whose errors say what to type instead of a FastChat or LitGPT spelling among the
    arguments (`--repetition_penalty`, `--base-model-path`, `--gptq-ckpt`, `--precision bf16-true`), where
    argparse said only "unrecognized arguments" or "the following arguments are required"."""

    typed: list[str] = []

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self.typed = list(sys.argv[1:] if args is None else args)  # a subcommand's parser: what follows it
        return super().parse_known_args(args, namespace)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extra = self.parse_known_args(args, namespace)
        if extra and (said := self.switch_given_a_value()):
            self.error(said)
        options = set(self._option_string_actions)  # the command's, and its subcommand's that was typed
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None):
                options |= set(action.choices[getattr(parsed, action.dest)]._option_string_actions)
        # not where a flag the command lacks was left over too (`vicuna chat M --precision bf16-true`): the
        # words after the model are then no question to pipe, nor is the command right with the model moved
        if (
            extra
            and not any(word.startswith("-") and word.split("=")[0] not in options for word in extra)
            and not extra[0].startswith("-")  # train's --output-dir after `train inspect`: no model
            and extra[0] in self.typed
            and "--model-path" in options
        ):
            # `vicuna chat llama3`, as `ollama run llama3` takes its model: argparse said only "unrecognized
            # arguments: llama3"; and `vicuna chat --model-path M "a question"` (or `vicuna chat M "a
            # question"`), as `ollama run M "a question"` takes one, was told to name the question as the model
            from vicuna.shell import quote

            named = getattr(parsed, "model_path", None) is not None
            message = extra[0 if named else 1 :] if self.prog == "vicuna chat" else []
            if message:
                fixed = list(self.typed)
                for word in message:  # its last place: `--model-path hi hi` keeps the first
                    del fixed[max(at for at, typed in enumerate(fixed) if typed == word)]
                if not named:
                    fixed.insert(fixed.index(extra[0]), "--model-path")
                command = f"{self.prog} {' '.join(quote(word) for word in fixed)}"
                self.error(
                    f"unrecognized argument {' '.join(message)}: the chat reads its messages at its prompt or from a "
                    f"pipe (`echo {quote(' '.join(message))} | {command}`)"
                )
            if not named:
                self.error(self.model_named_without_model_path(extra[0]))
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed

    def actions(self) -> dict[str, argparse.Action]:
        """Each option string of the command's and its subcommands' (`vicuna bench latency`) parsers."""
        found = dict(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found |= sub._option_string_actions
        return found

    def switch_given_a_value(self) -> str | None:
        """What to say where a flag that takes no value was given one, as LitGPT's (jsonargparse's) take
        them: `vicuna chat M --multiline true` was told to pipe 'true' to the model, `vicuna train ...
        --lora true` that 'true' was no choice of its subcommand (inspect)."""
        actions = self.actions()
        for flag, value in zip(self.typed, self.typed[1:], strict=False):
            if flag in actions and actions[flag].nargs == 0 and value.lower() in ("true", "false"):
                return f"{flag} takes no value: typed alone it is on, left out off"
        return None

    def model_typed_before_flags(self, word: str, known: set[str]) -> bool:
        """Whether `word`, typed where argparse wanted another word, is a model named as LitGPT and Ollama
        name it: the command takes --model-path, no --model-path (or an abbreviation of it) was typed, and
        the word is no mistyped subcommand (`vicuna train inpsect`)."""
        import difflib

        flags = [typed.split("=", 1)[0] for typed in self.typed if typed.startswith("--")]
        subcommands = [
            name
            for action in self._actions
            if isinstance(action, argparse._SubParsersAction)
            for name in action.choices
        ]
        return (
            "--model-path" in known
            and word in self.typed
            and not word.startswith("-")
            and not any(len(flag) > 4 and "--model-path".startswith(flag) for flag in flags)
            and not difflib.get_close_matches(word, subcommands)
        )

    def model_named_without_model_path(self, word: str) -> str:
        """The error for a model typed as `word` alone, with the command that names it with --model-path."""
        from vicuna.shell import quote

        fixed = list(self.typed)
        fixed.insert(fixed.index(word), "--model-path")
        command = f"{self.prog} {' '.join(quote(typed) for typed in fixed)}"
        return f"unrecognized argument {word}: the model is named with --model-path (`{command}`)"

    def error(self, message: str) -> NoReturn:
        from vicuna.fastchat_flags import advice, unknown_flags

        known = set(self.actions())
        unknown = unknown_flags(self.typed, known)
        if said := self.switch_given_a_value():
            message = said
        elif unknown and not message.startswith("unrecognized argument") and ": expected " not in message:
            # argparse's error may follow from a flag it did not know: `vicuna train ... --foo 3` took 3 for
            # the subcommand (`argument inspect: invalid choice: '3'`), `lora merge --out-dir x` said --output
            # is required; the flag is what to fix. Not where a flag went without its value, which argparse
            # will not take from a word that begins with '--' (`--conv-system-msg --terse`): --terse is no flag
            message = f"unrecognized argument {unknown[0]}"
        elif (choice := re.search(r"invalid choice: '([^']*)'", message)) and self.model_typed_before_flags(
            choice[1], known
        ):
            # `vicuna train MODEL --data d.json`, as `litgpt finetune_lora MODEL` takes its model, was
            # "argument inspect: invalid choice: 'MODEL'": the model read as train's subcommand
            message = self.model_named_without_model_path(choice[1])
        taken = re.match(r"argument (--[^\s:/]+)", message)  # argparse's "argument --stream-interval: ..."
        for token in self.typed if taken else ():
            flag = token.split("=", 1)[0]
            if flag.startswith("--") and flag != taken[1] and taken[1].startswith(flag):
                # `serve --stream true` (LitGPT's) was "argument --stream-interval: invalid float value: 'true'",
                # a flag never typed: argparse takes a unique abbreviation
                message += f" ({flag}, as typed, is taken for {taken[1]})"
                break
        super().error(advice(self.typed, known) or message)


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of `vicuna NAME`, its subcommands' parsers (e.g. `vicuna delta apply`) included."""
    parser = CommandParser(
        prog=f"vicuna {name}", description=COMMANDS[name][1], formatter_class=HelpWithDefaults
    )
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            said = {choice.dest: choice.help for choice in action._choices_actions}  # its line in the list
            for called, sub in action.choices.items():
                sub.formatter_class = HelpWithDefaults
                sub.description = sub.description or said.get(called)  # `vicuna delta apply --help` said none
    return parser


# OpenMP's worker threads (PyTorch's and our kernel's) spin after each parallel region before they sleep:
# with libgomp's default of 300,000 spins, milliseconds after every decode step, holding cores that a
# server's event loop, its clients or the terminal need (measured on 2 cores: the API streamed at 0.75x
# the engine's own rate with the default, 0.93x with 20,000, which decodes as fast). libgomp reads this
# once, when torch loads it, so it is set before any command imports torch; a value already set is kept.
SPIN_COUNT = "20000"

SIGPIPE_STATUS = 128 + 13  # a shell's status for a program ended by SIGPIPE (13 on Linux and macOS)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
    # Output to a file or a pipe is written in the locale's encoding: on Windows its ANSI code page (cp1252
    # in the West), where a Chinese reply or file name ended the command with UnicodeEncodeError.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS:
        from vicuna.fastchat_flags import COMMANDS as FASTCHAT_COMMANDS
        from vicuna.fastchat_flags import litgpt_advice, ollama_advice

        module = argv[0].rsplit(".", 1)[-1]  # `vicuna cli`, `vicuna fastchat.serve.cli`: FastChat's modules
        if module in FASTCHAT_COMMANDS:
            print(
                f"vicuna: error: {argv[0]} is FastChat's; here it is vicuna {FASTCHAT_COMMANDS[module]}",
                file=sys.stderr,
            )
            return 2
        # `vicuna run`, `vicuna pull`, `vicuna list`: Ollama's commands; `vicuna finetune_lora`: LitGPT's
        if said := ollama_advice(argv[0]) or litgpt_advice(argv[0]):
            print(f"vicuna: error: {said}", file=sys.stderr)
            return 2
    if not argv:  # `vicuna` alone, or a script's `vicuna $COMMAND` with it empty: exited 0, as if done
        build_parser().print_help(sys.stderr)
        return 2
    if argv[0] not in COMMANDS:
        build_parser().parse_args(argv)
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    args = command_parser(name).parse_args(rest)

    from vicuna.errors import Terminated, VicunaError

    def terminated(signum: int, frame: FrameType | None) -> None:
        if not in_finalizer(frame):
            raise Terminated
        # Python drops what a __del__ raises ("Exception ignored in ...__del__"): a SIGTERM that came while
        # an object was collected (rich's, gguf's, during a conversion) was lost and the command went on.
        # Sent again a moment later, it is raised where the command runs.
        again = getattr(signal, "pthread_kill", None)
        main_thread = threading.main_thread().ident
        resend = (lambda: again(main_thread, signum)) if again else (lambda: signal.raise_signal(signum))
        timer = threading.Timer(0.05, resend)
        timer.daemon = True
        timer.start()

    # SIGTERM ended every command at once: no cleanup, no word on how to go on, and `docker stop` of a
    # command run as a container's PID 1 (which the kernel spares a signal it has no handler for) waited
    # 10 s for SIGKILL. Windows sends no SIGTERM: there Ctrl-Break, and the CTRL_BREAK_EVENT with which a
    # script or a service wrapper stops a console program, come as SIGBREAK, which did the same. Not where
    # the parent set one ignored; signals are handled in the main thread only.
    stops = [signal.SIGTERM, *([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])]
    watched = {
        stop: signal.signal(stop, terminated)
        for stop in stops
        if threading.current_thread() is threading.main_thread() and signal.getsignal(stop) is signal.SIG_DFL
    }
    try:
        return int(module.main(args) or 0)
    except VicunaError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        # the output's reader has gone (`vicuna chat | head -c 10`, `vicuna template list | head -1`), which
        # was said "error: Broken pipe" with status 1: here, as for `yes | head -1`, nothing is said and the
        # status is that of a program ended by SIGPIPE. What is left in stdout's buffer goes nowhere, not
        # to a pipe that would fail again at the exit.
        with contextlib.suppress(AttributeError, OSError):  # no file under it: closed, or a test's capture
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return SIGPIPE_STATUS
    except OSError as err:  # a full disk, a read-only folder, a denied permission: said without a traceback
        from vicuna.weights.disk import os_error_said

        print(f"error: {os_error_said(err)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as err:
        print("interrupted" + (f"; {RESUME_HINTS[name]}" if name in RESUME_HINTS else ""), file=sys.stderr)
        return getattr(err, "exit_code", 130)
    finally:
        for stop, previous in watched.items():
            signal.signal(stop, previous)


def in_finalizer(frame: FrameType | None) -> bool:
    """Whether `frame` runs inside a `__del__`, where an exception raised is printed and dropped."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def run() -> NoReturn:
    """The `vicuna` program (`python -m vicuna`, the installed script): `main`, then the process ends without
    Python's teardown of the interpreter. With PyTorch and transformers loaded, that teardown collected and
    freed the objects of ~2,600 modules one by one after the command was done: 3.5 s of every `vicuna chat`
    piped a question on 2 busy cores, before the shell got its prompt back (now ~0.3 s). What the exit
    owes is still done, in Python's order: the atexit functions (logging's flush, temporary folders,
    coverage), then the output. Where a thread that is not a daemon still runs, a profiler or a debugger
    watches (cProfile writes its report after the program), or the output cannot be written (a closed pipe),
    the exit is Python's own, which waits for the thread, lets the profiler report, or says what failed."""
    code = main()
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if any(t.is_alive() for t in others) or sys.getprofile() is not None or sys.gettrace() is not None:
        raise SystemExit(code)
    atexit._run_exitfuncs()  # and forgets them: the exit below, or Python's, does not run them again
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None: started with it closed
                stream.flush()
    except (OSError, ValueError):  # ValueError: closed by the command
        raise SystemExit(code) from None
    os._exit(code)
