"""LoRA: `vicuna train --lora` writes an adapter; `vicuna lora merge` folds it into a normal checkpoint
that computes what the adapter on its base computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vicuna.cli import main as cli

DATA = [
    {
        "messages": [
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi! How are you today?"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "The capital of Japan?"},
            {"role": "assistant", "content": "Tokyo."},
        ]
    },
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DATA), encoding="utf-8")
    out = root / "adapter"
    args = [
        "train",
        "--model-path",
        str(tiny_llama_dir),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--lora",
    ]
    args += ["--lora-target", "all-linear", "--lora-dropout", "0", "--lr", "1e-2", "--max-steps", "8"]
    assert cli([*args, "--batch-size", "2", "--conv-template", "chatml", "--gradient-checkpointing"]) == 0
    return out


def test_lora_run_writes_an_adapter_with_its_template(adapter):
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists()  # only the small adapter, not the base again
    assert json.loads((adapter / "vicuna.json").read_text()) == {"conv_template": "chatml"}


def test_merge_gives_the_logits_of_the_adapter_applied(adapter, tiny_llama_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert (
        cli(["lora", "merge", "--base", str(tiny_llama_dir), "--adapter", str(adapter), "--output", str(out)])
        == 0
    )
    assert json.loads((out / "vicuna.json").read_text()) == {"conv_template": "chatml"}
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()

    ids = torch.tensor([[1, 17, 42, 99, 150, 7, 230, 5]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
        base_logits = base(ids).logits
        applied = PeftModel.from_pretrained(base, adapter).eval()
        applied_logits = applied(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    assert (applied_logits - base_logits).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(merged_logits, applied_logits, rtol=1e-4, atol=1e-4)


def test_unknown_lora_target_is_named(tiny_llama_dir, adapter, tmp_path, capsys):
    data = adapter.parent / "data.jsonl"
    args = [
        "train",
        "--model-path",
        str(tiny_llama_dir),
        "--data",
        str(data),
        "--output-dir",
        str(tmp_path / "o"),
    ]
    assert cli([*args, "--lora", "--lora-target", "qq_proj"]) == 2
    assert "--lora-target qq_proj:" in capsys.readouterr().err


def test_merge_refuses_bad_folders(adapter, tiny_llama_dir, tmp_path, capsys):
    args = ["lora", "merge", "--base", str(tiny_llama_dir), "--output"]
    assert cli([*args, str(tmp_path / "m"), "--adapter", str(tiny_llama_dir)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert cli([*args, str(tmp_path / "exists"), "--adapter", str(adapter)]) == 2
    assert "already exists" in capsys.readouterr().err
