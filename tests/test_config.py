"""Settings: where the cache lives, the flags every model command takes, and no torch beneath them."""

from __future__ import annotations

import re
import subprocess
import sys
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


@pytest.mark.parametrize(
    "command",
    [
        ["chat"],
        ["serve"],
        ["train"],
        ["train", "inspect"],
        ["template", "render", "vicuna_v1.1", "--messages", "m"],
    ],
)
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


def test_the_pure_python_modules_load_neither_torch_nor_the_engine():
    """STYLE.md's first layer: the CLI's flags, the templates and the API's schemas, which weights and the
    engine build on. A torch import there costs every command that only parses flags or renders a prompt
    the seconds PyTorch takes to load; an engine import turns the layers around."""
    code = (
        "import sys, vicuna.config, vicuna.conversation, vicuna.protocol\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'vicuna'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    pure = {"vicuna"} | {
        f"vicuna.{name}" for name in ("config", "conversation", "errors", "protocol", "shell", "textfile")
    }
    assert sorted(set(loaded) - pure)[:3] == []  # the first few that came with them


def test_one_stop_string_is_one_stop_not_its_characters():
    """From Python, `SamplingParams(stop="###")` (OpenAI's `stop` takes a string) stopped at any "#"."""
    from vicuna.config import SamplingParams

    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["###", "\n\n"]).stop == ("###", "\n\n")


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_new_tokens", 64.0), ("top_k", None), ("logprobs", True), ("seed", "1"), ("temperature", "0.7")],
)
def test_a_setting_of_the_wrong_type_is_refused_by_name(field, value):
    """From Python these were taken, or failed with "'>=' not supported between 'str' and 'int'", and a float
    max_new_tokens or logprobs=True failed only as the reply began, from inside the engine."""
    from vicuna.config import SamplingParams

    with pytest.raises(TypeError, match=rf"^{field} must be an? (int|number), not {re.escape(repr(value))}$"):
        SamplingParams(**{field: value})


def test_stop_none_is_no_stop_and_numpy_numbers_are_taken():
    import numpy as np

    from vicuna.config import SamplingParams

    assert SamplingParams(stop=None, stop_token_ids=None).stop == ()
    assert SamplingParams(max_new_tokens=np.int64(8), temperature=np.float32(0.5)).max_new_tokens == 8
    with pytest.raises(TypeError, match="stop must be a string or a sequence of strings"):
        SamplingParams(stop=[1])


def test_torch_s_dtype_and_device_objects_are_taken_by_name():
    import torch

    from vicuna.config import ModelSettings

    settings = ModelSettings(dtype=torch.bfloat16, device=torch.device("cpu"))
    assert (settings.dtype, settings.device) == ("bfloat16", "cpu")
    with pytest.raises(VicunaError, match="not 'float64'"):
        ModelSettings(dtype=torch.float64)
