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


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in DATA), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "adapter"
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


def test_the_default_lora_target_is_the_fused_attention_layer_of_a_phi3_model(tiny_llama_dir, data, tmp_path):
    """Phi-3 computes q, k and v in one layer (qkv_proj): `vicuna train --lora` was refused for its default
    target, q_proj,v_proj, which the user never typed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny_models import tiny_config

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("phi3", len(tok))).save_pretrained(tmp_path / "phi3")
    tok.save_pretrained(tmp_path / "phi3")
    args = ["train", "--model-path", str(tmp_path / "phi3"), "--data", str(data), "--max-steps", "1"]
    assert cli([*args, "--output-dir", str(tmp_path / "adapter"), "--lora"]) == 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"] == [
        "qkv_proj"
    ]


def test_lora_run_writes_an_adapter_with_its_template(adapter):
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists()  # only the small adapter, not the base again
    assert json.loads((adapter / "vicuna.json").read_text()) == {"conv_template": "chatml"}
    # so does each checkpoint, which `vicuna lora merge` may be given instead
    assert json.loads((adapter / "checkpoint-8" / "vicuna.json").read_text()) == {"conv_template": "chatml"}


def test_an_adapter_given_as_the_model_is_told_the_merge_command_with_its_base(adapter, tiny_llama_dir):
    from vicuna.engine.loader import resolve_model_path
    from vicuna.errors import ModelLoadError
    from vicuna.shell import quote

    with pytest.raises(ModelLoadError) as err:
        resolve_model_path(str(adapter))
    assert f"`vicuna lora merge --base {quote(str(tiny_llama_dir))} --adapter {quote(str(adapter))} " in str(
        err.value
    )


def test_merge_gives_the_logits_of_the_adapter_applied(adapter, tiny_llama_dir, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert (
        cli(["lora", "merge", "--base", str(tiny_llama_dir), "--adapter", str(adapter), "--output", str(out)])
        == 0
    )
    assert "warning" not in capsys.readouterr().err  # its own base
    assert json.loads((out / "vicuna.json").read_text()) == {"conv_template": "chatml"}
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    assert cli(["verify", str(out), "--no-progress"]) == 0
    from vicuna.weights.disk import new_file_mode

    # as any new file: safetensors made model.safetensors readable by its owner only, so others who could read
    # the folder (a team's shared models) could not load it
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(
        [p.name for p in out.iterdir()], new_file_mode()
    )

    ids = torch.tensor([[1, 17, 42, 99, 150, 7, 230, 5]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
        base_logits = base(ids).logits
        applied = PeftModel.from_pretrained(base, adapter).eval()
        applied_logits = applied(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    assert (applied_logits - base_logits).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(merged_logits, applied_logits, rtol=1e-4, atol=1e-4)


def test_merge_without_base_uses_the_base_the_adapter_records(adapter, tiny_llama_dir, tmp_path, capsys):
    """--base was required, though `vicuna train --lora` records the base in adapter_config.json (LitGPT's
    merge_lora needs none)."""
    merge = ["lora", "merge", "--adapter", str(adapter), "--output"]
    assert cli([*merge, str(tmp_path / "recorded")]) == 0
    captured = capsys.readouterr()
    assert f"Merged {adapter} into {tiny_llama_dir}: {tmp_path / 'recorded'}" in captured.out
    assert "warning" not in captured.err
    assert cli([*merge, str(tmp_path / "given"), "--base", str(tiny_llama_dir)]) == 0
    weights = "model.safetensors"
    assert (tmp_path / "recorded" / weights).read_bytes() == (tmp_path / "given" / weights).read_bytes()


def test_an_adapter_of_a_base_named_by_a_relative_path_merges_from_another_folder(
    tiny_llama_dir, data, tmp_path, monkeypatch, capsys
):
    """`vicuna train --model-path base --lora` recorded "base" as typed: a merge run elsewhere, without --base,
    looked for it there."""
    import shutil

    shutil.copytree(tiny_llama_dir, tmp_path / "runs" / "base")
    monkeypatch.chdir(tmp_path / "runs")
    train_adapter(Path("base"), data, Path("adapter"))
    assert f"vicuna lora merge --base {tmp_path / 'runs' / 'base'} " in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert cli(["lora", "merge", "--adapter", "runs/adapter", "--output", "merged"]) == 0
    assert f"into {tmp_path / 'runs' / 'base'}: merged" in capsys.readouterr().out


@pytest.mark.parametrize("recorded", ["gone", None])
def test_merge_without_base_names_a_recorded_base_that_is_not_there(adapter, tmp_path, capsys, recorded):
    """A base folder deleted or moved since training (or the built-in model's copy, which an upgrade
    replaces), or none recorded: said, naming it, with --base to pass."""
    import shutil

    moved = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    config = json.loads((moved / "adapter_config.json").read_text())
    base = str(tmp_path / recorded) if recorded else None
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
    assert cli(["lora", "merge", "--adapter", str(moved), "--output", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    said = (
        f"records {base} as the base model, which is not there" if base else "does not record the base model"
    )
    assert f"error: {moved / 'adapter_config.json'} {said}" in err
    assert "pass --base, the model the adapter was trained on" in err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()


def test_merge_with_no_progress_draws_no_bar_on_a_terminal(adapter, tmp_path, monkeypatch, screen, capsys):
    """`lora merge` had no --no-progress, which `delta apply`, `convert` and `get` take: on a terminal
    transformers' loading and saving bars and the manifest's hashing bar were drawn whatever was asked."""
    import sys

    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setenv("TERM", "xterm")
    merge = ["lora", "merge", "--adapter", str(adapter), "--output"]
    assert cli([*merge, str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert screen.getvalue() == ""
    assert f"Merged {adapter} into " in capsys.readouterr().out
    assert cli([*merge, str(tmp_path / "drawn")]) == 0  # the bars it leaves out
    assert "Loading weights" in screen.getvalue() and "sha256 drawn.partial" in screen.getvalue()


def test_a_second_merge_into_the_output_one_is_writing_is_refused(
    adapter, tiny_llama_dir, tmp_path, capsys, monkeypatch
):
    """The same `vicuna lora merge` run twice at once (two terminals): both wrote into OUTPUT.partial, each
    removing the other's files, and one's manifest could list files the other was still writing. The second
    is now refused, naming the folder; the first one's model verifies."""
    import threading

    from vicuna.weights import manifest

    out, writing, go, results = tmp_path / "merged", threading.Event(), threading.Event(), []
    write_manifest = manifest.write_manifest

    def held(folder, **kwargs):  # the first merge, held before its manifest until the second was tried
        if not writing.is_set():
            writing.set()
            assert go.wait(timeout=600)
        return write_manifest(folder, **kwargs)

    monkeypatch.setattr(manifest, "write_manifest", held)
    args = ["lora", "merge", "--base", str(tiny_llama_dir), "--adapter", str(adapter), "--output", str(out)]
    first = threading.Thread(target=lambda: results.append(cli(args)))
    first.start()
    try:
        assert writing.wait(timeout=600)
        assert cli(args) == 2
        assert f"another vicuna job is writing {out} now" in capsys.readouterr().err
    finally:
        go.set()
        first.join()
    assert results == [0]
    assert cli(["verify", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_unknown_lora_target_is_named_before_anything_is_written(tiny_llama_dir, data, tmp_path, capsys):
    args = ["train", "--model-path", str(tiny_llama_dir), "--data", str(data)]
    args += ["--output-dir", str(tmp_path / "o"), "--lora", "--lora-target"]
    assert cli([*args, "qq_proj"]) == 2
    assert "--lora-target qq_proj:" in capsys.readouterr().err
    assert cli([*args, "q_proj,vv_proj"]) == 2  # peft itself would quietly leave out the typo
    assert "--lora-target q_proj,vv_proj: 'vv_proj' names no module of" in capsys.readouterr().err
    assert cli([*args, "mlp"]) == 2  # a module LoRA cannot wrap
    assert "--lora-target mlp:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_merge_refuses_bad_folders(adapter, tiny_llama_dir, tmp_path, capsys):
    args = ["lora", "merge", "--base", str(tiny_llama_dir), "--output"]
    assert cli([*args, str(tmp_path / "m"), "--adapter", str(tiny_llama_dir)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    # LitGPT's merge_lora takes OUT_DIR/final: here the adapter is --output-dir itself
    assert cli([*args, str(tmp_path / "m"), "--adapter", str(adapter / "final")]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"no adapter_config.json; expected a LoRA adapter folder; vicuna train --lora writes the adapter into "
            f"--output-dir itself: --adapter {adapter}"
        )
    )
    final = tmp_path / "final"  # and LitGPT's own LoRA checkpoint
    final.mkdir()
    (final / "lit_model.pth.lora").write_bytes(b"")
    assert cli([*args, str(tmp_path / "m"), "--adapter", str(final)]) == 2
    assert (
        f"it is a LitGPT LoRA checkpoint: merge it with `litgpt merge_lora {final}`"
        in capsys.readouterr().err
    )
    (tmp_path / "exists").mkdir()
    assert cli([*args, str(tmp_path / "exists"), "--adapter", str(adapter)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_merge_names_a_truncated_adapter_file(adapter, tiny_llama_dir, tmp_path, capsys):
    """An adapter_model.safetensors cut short (a copy or download that stopped) ended in safetensors'
    "SafetensorError: Error while deserializing header" with a traceback."""
    import shutil

    cut = Path(shutil.copytree(adapter, tmp_path / "cut"))
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    args = ["lora", "merge", "--base", str(tiny_llama_dir), "--adapter", str(cut), "--output"]
    assert cli([*args, str(tmp_path / "merged")]) == 2
    assert f"error: {weights}: cut short: 1000 bytes on disk" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()


def test_merge_names_an_adapter_config_that_is_not_utf8(adapter, tiny_llama_dir, tmp_path, capsys):
    """A GBK adapter_config.json (edited on a Chinese Windows) ended in UnicodeDecodeError, with a traceback."""
    import shutil

    edited = Path(shutil.copytree(adapter, tmp_path / "edited"))
    (edited / "adapter_config.json").write_bytes('{"base_model_name_or_path": "模型"}'.encode("gbk"))
    args = ["lora", "merge", "--base", str(tiny_llama_dir), "--adapter", str(edited), "--output"]
    assert cli([*args, str(tmp_path / "merged")]) == 2
    expected = f"error: {edited / 'adapter_config.json'}: not a valid adapter config (UnicodeDecodeError"
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(("field", "value"), [("r", "8"), ("lora_alpha", 0)])
def test_merge_names_an_adapter_config_field_of_the_wrong_type(
    adapter, tiny_llama_dir, tmp_path, capsys, field, value
):
    """An r of "8" ended in peft's "TypeError: '<=' not supported between instances of 'str' and 'int'"
    with a traceback; a lora_alpha of 0 scaled the update to nothing and wrote the base as the merge."""
    import shutil

    edited = Path(shutil.copytree(adapter, tmp_path / "edited"))
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    args = ["lora", "merge", "--base", str(tiny_llama_dir), "--adapter", str(edited), "--output"]
    assert cli([*args, str(tmp_path / "merged")]) == 2
    expected = f"error: {edited / 'adapter_config.json'}: {field} is {value!r}; expected a number above 0"
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def train_adapter(model: Path, data: Path, out: Path, *extra: str) -> Path:
    args = ["train", "--model-path", str(model), "--data", str(data), "--output-dir", str(out), "--lora"]
    assert cli([*args, "--max-steps", "1", *extra]) == 0
    return out


def bigger_vocab(tiny_llama_dir: Path, dest: Path) -> Path:
    """The tiny model with one token added to its tokenizer and its embedding: 401 tokens."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(tiny_llama_dir, dest)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    tokenizer.add_tokens(["<extra>"])
    model = AutoModelForCausalLM.from_pretrained(dest)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def test_merge_refuses_an_adapter_of_another_base(tiny_llama_dir, data, tmp_path, capsys):
    from tests.tiny_models import write_tiny_llama

    merge = ["lora", "merge", "--base", str(tiny_llama_dir), "--output", str(tmp_path / "m"), "--adapter"]
    # trained on a model of 401 tokens: the weights fit the 400-token base, its tokenizer does not
    big = bigger_vocab(tiny_llama_dir, tmp_path / "big")
    assert cli([*merge, str(train_adapter(big, data, tmp_path / "a401"))]) == 2
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'a401' / 'adapter_config.json'} names {big} as its base" in err
    assert "the tokenizer has 401 tokens but the model's embedding has 400 rows" in err
    assert "the adapter was trained on another model: merge it into its own base" in err

    # another width: the adapter's matrices do not fit the base's layers
    narrow = write_tiny_llama(tmp_path / "narrow", hidden_size=32, intermediate_size=64)
    assert cli([*merge, str(train_adapter(narrow, data, tmp_path / "a32"))]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.q_proj.lora_A.weight has shape (8, 32)" in err
    assert "model.layers.0.self_attn.q_proj has 64 inputs" in err

    # another depth: the adapter has layers the base lacks
    deep = write_tiny_llama(tmp_path / "deep", num_hidden_layers=3)
    assert cli([*merge, str(train_adapter(deep, data, tmp_path / "a3"))]) == 2
    assert "model.layers.2.self_attn.q_proj, which" in capsys.readouterr().err

    # the other way: a base deeper than the adapter, whose last layer the adapter would leave alone
    shallow = train_adapter(tiny_llama_dir, data, tmp_path / "a2")
    assert cli([*merge[:2], "--base", str(deep), *merge[4:], str(shallow)]) == 2
    err = capsys.readouterr().err
    assert "the adapter has no weights for model.layers.2.self_attn.q_proj (and 1 more), which" in err
    # unless it was trained on some layers only, by choice (peft's layers_to_transform)
    config = json.loads((shallow / "adapter_config.json").read_text())
    (shallow / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": [0, 1]}))
    assert cli([*merge[:2], "--base", str(deep), *merge[4:], str(shallow)]) == 0
    (tmp_path / "m").rename(tmp_path / "m-deep")
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_seed_fixes_the_adapters_initialisation(tiny_llama_dir, data, tmp_path):
    """The adapter was initialised from whatever state the random generator was in: a second run in the
    same process (a notebook, a sweep) with the same --seed trained from another start, and --seed did not
    change the start of a run in a fresh process."""
    import torch
    from safetensors.torch import load_file

    def run(out: str, seed: str) -> dict:
        args = ["train", "--model-path", str(tiny_llama_dir), "--data", str(data), "--lora"]
        assert cli([*args, "--output-dir", str(tmp_path / out), "--max-steps", "1", "--seed", seed]) == 0
        return load_file(tmp_path / out / "adapter_model.safetensors")

    first, again, other = run("first", "7"), run("again", "7"), run("other", "8")
    assert first.keys() == again.keys() == other.keys()
    for name in first:
        torch.testing.assert_close(again[name], first[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(other[n], first[n]) for n in first if "lora_A" in n)


@pytest.mark.parametrize(
    "os_error", ["No space left on device (os error 28)", "Disk quota exceeded (os error 122)"]
)
def test_merge_onto_a_full_disk_is_one_line_and_leaves_nothing(
    adapter, tiny_llama_dir, tmp_path, capsys, monkeypatch, os_error
):
    """A disk or quota that fills as the merged weights are written: safetensors' own SafetensorError came
    out as a traceback, and OUTPUT.partial, as big as the model, stayed on the full disk."""
    from safetensors import SafetensorError
    from transformers import modeling_utils

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # what got written before the disk filled
        raise SafetensorError(f"Error while serializing: I/O error: {os_error}")

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    out = tmp_path / "merged"
    args = ["lora", "merge", "--base", str(tiny_llama_dir), "--adapter", str(adapter), "--output", str(out)]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {out}: the merged model could not be written")
        and "is free on that disk" in err
    )
    assert os_error.split(" (")[0].lower() in err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_merge_onto_a_disk_without_room_for_the_model_is_refused_before_writing(
    adapter, tiny_llama_dir, tmp_path, capsys, monkeypatch
):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "merged"
    args = ["lora", "merge", "--base", str(tiny_llama_dir), "--adapter", str(adapter), "--output", str(out)]
    assert cli(args) == 2
    assert f"error: merging into {out} needs 501.0 kB of free disk in {tmp_path}, but only 1.0 kB" in (
        capsys.readouterr().err
    )
    assert list(tmp_path.iterdir()) == []
