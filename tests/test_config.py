"""Settings: where the cache lives, and the flags every model command takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from vicuna.config import vicuna_home
from vicuna.errors import VicunaError


def test_no_home_folder_says_to_set_vicuna_home(monkeypatch):
    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("VICUNA_HOME")
    monkeypatch.setattr(Path, "home", no_home)
    with pytest.raises(VicunaError, match=r"HOME is not set\); set VICUNA_HOME to a writable folder"):
        vicuna_home()


@pytest.mark.parametrize("command", [["chat"], ["serve"], ["train"], ["train", "inspect"]])
def test_a_system_prompt_typed_at_a_gbk_terminal_is_refused_before_loading(command, capsys):
    """A terminal that sends GBK to a server whose locale is UTF-8 gives the flag's value as escapes (as
    Python reads undecodable arguments), which ended the chat with a tokenizer's TypeError."""
    from vicuna.cli import command_parser

    typed = "你是助手".encode("gbk").decode("utf-8", "surrogateescape")
    with pytest.raises(SystemExit) as refused:
        command_parser(command[0]).parse_args([*command[1:], "--conv-system-msg", typed])
    assert refused.value.code == 2
    assert "argument --conv-system-msg: not UTF-8 text: set the terminal's encoding to UTF-8" in (
        capsys.readouterr().err
    )
    assert command_parser(command[0]).parse_args([*command[1:], "--conv-system-msg", "你是助手"])
