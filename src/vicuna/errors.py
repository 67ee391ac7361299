"""Errors that are the user's to fix: the CLI prints them in one line and exits non-zero; the server
turns them into 4xx answers. Anything else is a bug and keeps its traceback."""

from __future__ import annotations


class VicunaError(Exception):
    """A problem with the user's input or machine, explained in the message."""

    exit_code = 2


class Terminated(BaseException):
    """SIGTERM (`docker stop`, `systemctl stop`, `kill`), raised as Ctrl-C's KeyboardInterrupt is: the
    command's cleanup runs and it says how to go on, with exit status 143 (128 + 15) instead of 130. Not a
    KeyboardInterrupt: where Ctrl-C stops only a reply (`vicuna chat`), SIGTERM still ends the program."""

    exit_code = 143


class ModelLoadError(VicunaError):
    """The checkpoint cannot be loaded: which file, which field, what was expected."""


class DoesNotFitError(VicunaError):
    """The model will not fit the chosen device(s); the message lists the flags that would fit."""


class ShuttingDownError(VicunaError):
    """The server is stopping: the request was not taken, and may be sent again (to it once restarted)."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry the request")


class ServerBusyError(VicunaError):
    """Every row of the batch is taken and no more replies may wait (--max-queue): to send again shortly."""

    def __init__(self) -> None:
        super().__init__("The server is busy with other replies: try again shortly.")


class ContextTooLongError(VicunaError):
    """The prompt and the requested reply do not fit the model's context window."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_window: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_window = context_window
        super().__init__(
            f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for "
            f"({prompt_tokens + max_new_tokens} in all), but the model's context window is "
            f"{context_window} tokens"
        )
