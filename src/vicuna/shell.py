"""Paths in the commands printed for the user to paste, quoted for the shell they use."""

from __future__ import annotations

import re
import shlex
import sys


def quote(text: str) -> str:
    """`text` as one argument of a command line: POSIX shell quoting, or on Windows, where cmd takes single
    quotes as part of the name, double quotes (read by cmd and PowerShell alike; Windows names cannot hold
    one) around anything but letters, digits and -_.:\\/."""
    if sys.platform != "win32":
        return shlex.quote(text)
    return text if re.fullmatch(r"[\w\-.:\\/]+", text) else f'"{text}"'


def pip_install(*args: str) -> str:
    """The command that installs a package where vicuna runs. A plain `pip` is often another environment's:
    vicuna installed with pipx, or run as .venv/bin/vicuna without activating the venv, where `pip install`
    put the package beside another Python and vicuna still did not find it."""
    return " ".join(quote(arg) for arg in (sys.executable, "-m", "pip", "install", *args))
