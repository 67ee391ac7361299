"""`vicuna delta make|apply`: round trips over safetensors and `.bin` inputs sharded differently (and the
Vicuna v0 32001-row vocabulary), named errors for mismatched checkpoints, resuming an interrupted apply,
and peak memory under 0.75x the model's size."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.tiny_models import write_tiny_llama
from tests.weights.test_checkpoint import peak_rss_above_idle, save_folder
from vicuna.cli import main
from vicuna.errors import VicunaError
from vicuna.weights import checkpoint
from vicuna.weights.checkpoint import CheckpointReader, side_files
from vicuna.weights.delta import apply_delta, make_delta
from vicuna.weights.manifest import MANIFEST_NAME, verify_manifest


def state_of(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {name: reader.get(name).clone() for name in reader.names}


def rewrite(src: Path, dst: Path, *, kind: str, files: int, index: bool, dtype=None, edit=None) -> Path:
    """`src`'s checkpoint saved again as `files` shards of `kind`, optionally cast or edited, with its config
    and tokenizer."""
    state = state_of(src)
    if dtype is not None:
        state = {n: t.to(dtype) for n, t in state.items()}
    if edit is not None:
        edit(state)
    save_folder(state, dst, kind=kind, files=files, index=index)
    for path in side_files(src):
        shutil.copyfile(path, dst / path.name)
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("delta-models")
    target = write_tiny_llama(root / "target", seed=1)

    def add_row(state):  # Vicuna v0 added a pad token: a row more in the embedding and lm_head
        gen = torch.Generator().manual_seed(5)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            state[name] = torch.cat([state[name], torch.randn(1, state[name].shape[1], generator=gen)])

    grown = rewrite(target, root / "target-32001", kind="safetensors", files=1, index=False, edit=add_row)
    config = json.loads((grown / "config.json").read_text())
    (grown / "config.json").write_text(json.dumps(config | {"vocab_size": 401}))
    base = write_tiny_llama(root / "base", seed=0)
    delta = make_delta(base, target, root / "delta", progress=False)
    return {"base": base, "target": target, "target-32001": grown, "delta": delta}


def test_round_trip_reproduces_the_target(tmp_path, models):
    base, target = models["base"], models["target"]
    delta = make_delta(base, target, tmp_path / "delta", progress=False)
    base_state, target_state, delta_state = state_of(base), state_of(target), state_of(delta)
    for name, tensor in delta_state.items():
        torch.testing.assert_close(tensor, target_state[name] - base_state[name], atol=0, rtol=0)
    assert (delta / "config.json").read_text() == (target / "config.json").read_text()

    out = apply_delta(base, delta, tmp_path / "merged", progress=False)
    merged = state_of(out)
    assert merged.keys() == target_state.keys()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, target_state[name], atol=1e-6, rtol=1e-6)
    assert verify_manifest(out, progress=False) == []
    assert not (tmp_path / "merged.partial").exists()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        assert (out / name).read_bytes() == (delta / name).read_bytes()

    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 77, 300, 12]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        want = AutoModelForCausalLM.from_pretrained(target).eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bin_inputs_sharded_differently_with_the_extra_vocabulary_row(tmp_path, models, capsys):
    """Base: 2 `.bin` files with an index, float32. Target: float16 safetensors, 3 files without an index,
    401 rows (Vicuna v0's 32001 against LLaMA's 32000)."""
    base = rewrite(models["base"], tmp_path / "base-bin", kind="bin", files=2, index=True)
    target = rewrite(
        models["target-32001"],
        tmp_path / "target-fp16",
        kind="safetensors",
        files=3,
        index=False,
        dtype=torch.float16,
    )
    code = main(
        ["delta", "make", "--base", str(base), "--target", str(target), "--delta", str(tmp_path / "d")]
    )
    assert code == 0
    assert "401 rows in the target and 400 in the base" in capsys.readouterr().err
    delta_bin = rewrite(tmp_path / "d", tmp_path / "delta-bin", kind="bin", files=1, index=False)

    code = main(
        ["delta", "apply", "--base", str(base), "--delta", str(delta_bin), "--target", str(tmp_path / "m")]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "model.embed_tokens.weight has 401 rows in the delta and 400 in the base" in err
    assert "lm_head.weight has 401 rows in the delta and 400 in the base" in err
    merged, target_state = state_of(tmp_path / "m"), state_of(target)
    assert {t.dtype for t in merged.values()} == {torch.float16}  # the delta's dtype
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, target_state[name], atol=2e-3, rtol=2e-3)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # the extra row, as it was
        assert merged[name].shape[0] == 401
        assert torch.equal(merged[name][400], target_state[name][400])
    assert json.loads((tmp_path / "m" / "config.json").read_text())["vocab_size"] == 401


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_sums_are_rounded_once_from_their_exact_float32_sum(tmp_path, models, dtype):
    """Each merged value is base + delta computed in float32 and rounded once to the checkpoint's dtype,
    as transformers' and FastChat's float32 arithmetic would give, with values of very different sizes."""

    def spread(state):  # sizes from 1e-6 to 1e3 within each tensor
        for name, t in state.items():
            state[name] = t * torch.logspace(-6, 3, t.numel()).reshape(t.shape)

    base = rewrite(
        models["base"], tmp_path / "b", kind="safetensors", files=1, index=False, dtype=dtype, edit=spread
    )
    delta = rewrite(models["delta"], tmp_path / "d", kind="safetensors", files=2, index=True, dtype=dtype)
    merged = state_of(apply_delta(base, delta, tmp_path / "m", progress=False))
    base_state, delta_state = state_of(base), state_of(delta)
    for name, tensor in merged.items():
        want = (base_state[name].float() + delta_state[name].float()).to(dtype)
        assert tensor.dtype == dtype and torch.equal(tensor.view(torch.int16), want.view(torch.int16)), name


def _edited(models, tmp_path, name, edit) -> Path:
    return rewrite(models["delta"], tmp_path / name, kind="safetensors", files=1, index=False, edit=edit)


def test_mismatched_checkpoints_name_the_tensor(tmp_path, models):
    base = models["base"]

    def extra(state):
        state["model.layers.9.mlp.gate_proj.weight"] = torch.zeros(2, 2)

    def missing(state):
        del state["model.norm.weight"]

    def narrower(state):
        state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:, :32]

    def fewer_rows(state):
        state["lm_head.weight"] = state["lm_head.weight"][:399]

    cases = [
        (extra, r"tensor model\.layers\.9\.mlp\.gate_proj\.weight in the delta .* but not in the base"),
        (missing, r"tensor model\.norm\.weight in the base .* but not in the delta"),
        (
            narrower,
            r"tensor model\.layers\.1\.mlp\.up_proj\.weight is 128x32 in the delta .* but 128x64 in the base",
        ),
        (fewer_rows, r"tensor lm_head\.weight is 399x64 in the delta .* but 400x64 in the base"),
    ]
    for edit, message in cases:
        delta = _edited(models, tmp_path, edit.__name__, edit)
        with pytest.raises(VicunaError, match=message) as err:
            apply_delta(base, delta, tmp_path / f"out-{edit.__name__}", progress=False)
        if edit is not extra:  # both have 2 layers: not said to be of two model sizes
            assert "model sizes" not in str(err.value)
        assert not (tmp_path / f"out-{edit.__name__}").exists()
        assert not (tmp_path / f"out-{edit.__name__}.partial").exists()

    with pytest.raises(VicunaError, match="is not a folder"):
        apply_delta(base, tmp_path / "nowhere", tmp_path / "o", progress=False)
    broken = rewrite(base, tmp_path / "broken", kind="safetensors", files=1, index=False)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(VicunaError, match=r"broken/model\.safetensors.*damaged or incomplete"):
        apply_delta(base, broken, tmp_path / "o", progress=False)


def test_a_delta_for_another_model_size_is_said_as_such(tmp_path, models):
    """A 13B delta on a 7B base listed "tensor model.layers.32... in the delta but not in the base" and no
    more: the layer counts say that the two are of different model sizes."""
    bigger = [
        write_tiny_llama(tmp_path / f"3-layers-{seed}", seed=seed, num_hidden_layers=3) for seed in (0, 1)
    ]
    delta = make_delta(*bigger, tmp_path / "delta-3-layers", progress=False)
    with pytest.raises(VicunaError) as mismatch:
        apply_delta(models["base"], delta, tmp_path / "out", progress=False)
    assert "tensor model.layers.2.input_layernorm.weight" in str(mismatch.value)
    assert str(mismatch.value).endswith(
        "(the delta has 3 layers and the base 2: they are of two model sizes, such as a 13B delta with a 7B "
        "base; pass the delta of the base's size)"
    )


def test_interrupted_apply_leaves_no_complete_looking_folder_and_resumes(
    tmp_path, models, monkeypatch, capsys
):
    monkeypatch.setattr(checkpoint, "MIN_SHARD_BYTES", 100_000)  # several shards from a tiny model
    base, target = models["base"], models["target"]
    delta = make_delta(base, target, tmp_path / "delta", progress=False)
    reference = apply_delta(base, delta, tmp_path / "reference", progress=False)
    shards = sorted(p.name for p in reference.glob("model-*.safetensors"))
    assert len(shards) >= 3

    import safetensors.torch

    real_save = safetensors.torch.save_file
    saved: list[str] = []

    def save_then_stop(tensors, filename, metadata=None):
        if len(saved) == 2:
            raise KeyboardInterrupt  # as if Ctrl-C hit while the third shard was being written
        real_save(tensors, filename, metadata=metadata)
        saved.append(Path(filename).name)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_stop)
    argv = ["delta", "apply", "--base", str(base), "--delta", str(delta), "--target", str(tmp_path / "out")]
    assert main([*argv, "--no-progress"]) == 130
    out, staging = tmp_path / "out", tmp_path / "out.partial"
    assert not out.exists()
    assert not (staging / MANIFEST_NAME).exists() and not (staging / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in staging.glob("*.safetensors")) == shards[:2]
    assert main(["verify", str(out)]) == 2

    saved.clear()
    monkeypatch.setattr(
        safetensors.torch,
        "save_file",
        lambda t, f, metadata=None: saved.append(f) or real_save(t, f, metadata=metadata),
    )
    assert main([*argv, "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert len(saved) == len(shards) - 2  # the two finished shards were kept
    assert not staging.exists()
    assert verify_manifest(out, progress=False) == []
    for name in shards + ["model.safetensors.index.json"]:
        assert (out / name).read_bytes() == (reference / name).read_bytes()


def test_peak_memory_stays_under_three_quarters_of_the_model(tmp_path):
    """A 150 MB float16 base and delta (3 safetensors files vs 2 `.bin` files): apply's peak RSS above idle
    must stay under 0.75x the model's size."""
    hidden, inter, layers, vocab = 1024, 2816, 6, 1000
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + f"self_attn.{x}_proj.weight": (hidden, hidden) for x in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden)}
        shapes |= {p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,)}
    state = {name: torch.full(shape, 0.01, dtype=torch.float16) for name, shape in shapes.items()}
    size = sum(t.numel() * 2 for t in state.values())
    save_folder(state, tmp_path / "base", kind="safetensors", files=3, index=True)
    save_folder(state, tmp_path / "delta", kind="bin", files=2, index=True)
    del state
    for path in side_files(write_tiny_llama(tmp_path / "tiny")):  # a config and tokenizer to check and copy
        shutil.copyfile(path, tmp_path / "delta" / path.name)
    job = (
        "from vicuna.weights.delta import apply_delta\napply_delta(*map(Path, sys.argv[1:]), progress=False)"
    )
    # the tokenizer is read in a few MB whatever the model's size: loaded once before idle is measured
    preload = "from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained(sys.argv[2])"
    above_idle = peak_rss_above_idle(
        job, *(str(tmp_path / n) for n in ("base", "delta", "out")), preload=preload
    )
    assert verify_manifest(tmp_path / "out", progress=False) == []
    assert size > 140e6
    assert above_idle < 0.75 * size, (
        f"peak RSS {above_idle / 1e6:.0f} MB above idle for a {size / 1e6:.0f} MB model"
    )


def test_a_delta_without_tokenizer_files_gets_the_base_s(tmp_path, models, capsys):
    delta = make_delta(models["base"], models["target"], tmp_path / "delta", progress=False)
    bare = shutil.copytree(
        delta, tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*")
    )
    out = apply_delta(models["base"], bare, tmp_path / "merged", progress=False)
    assert "has no tokenizer files: the base's are used" in capsys.readouterr().err
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(models["base"]))
    assert verify_manifest(out, progress=False) == []


def test_a_merge_where_neither_folder_has_tokenizer_files_says_the_result_needs_one(tmp_path, models, capsys):
    """The merge goes on (the weights are the hours of work), says the result has no tokenizer, and loading
    the result then says which files to copy."""
    from vicuna.config import ModelSettings
    from vicuna.engine.loader import load_engine
    from vicuna.errors import ModelLoadError

    no_tokenizer = shutil.ignore_patterns("tokenizer*", "special_tokens*")
    delta = make_delta(models["base"], models["target"], tmp_path / "delta", progress=False)
    bare_delta = shutil.copytree(delta, tmp_path / "bare-delta", ignore=no_tokenizer)
    bare_base = shutil.copytree(models["base"], tmp_path / "bare-base", ignore=no_tokenizer)
    out = apply_delta(bare_base, bare_delta, tmp_path / "merged", progress=False)
    err = capsys.readouterr().err
    assert f"neither the delta ({bare_delta}) nor the base ({bare_base}) has tokenizer files" in err
    assert "needs one before it can chat" in err
    assert not list(out.glob("tokenizer*")) and verify_manifest(out, progress=False) == []
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_engine(ModelSettings(model_path=str(out)), progress=False)


def test_a_delta_with_a_blank_eos_is_refused_before_merging(tmp_path, models):
    delta = make_delta(models["base"], models["target"], tmp_path / "delta", progress=False)
    broken = shutil.copytree(delta, tmp_path / "broken")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = broken / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["eos_token"] = None
            path.write_text(json.dumps(data))
    with pytest.raises(VicunaError, match="defines no EOS token"):
        apply_delta(models["base"], broken, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()


def test_a_decapoda_base_whose_tokenizer_the_merge_takes_is_named_before_merging(tmp_path, models):
    """A delta without tokenizer files takes the base's: decapoda-research's, with blank special tokens."""
    from tests.engine.test_loader import decapoda_tokenizer

    base = decapoda_tokenizer(shutil.copytree(models["base"], tmp_path / "llama-7b-hf"))
    delta = make_delta(models["base"], models["target"], tmp_path / "delta", progress=False)
    bare = shutil.copytree(
        delta, tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*")
    )
    with pytest.raises(VicunaError, match=r"'unk_token' are blank .*\"unk_token\": \"<unk>\""):
        apply_delta(base, bare, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()


def test_a_v0_delta_merged_into_a_folder_not_named_v0_keeps_v0_s_template(tmp_path, models, capsys):
    """FastChat's v0 instructions merge lmsys/vicuna-13b-delta-v0 into `vicuna-13b`: chatted in v1.1's format
    (a template is picked by the folder's name), v0 never saw its prompts nor stops at its '###'."""
    from vicuna.config import ModelSettings
    from vicuna.engine.loader import load_tokenizer, pick_template

    delta = make_delta(
        models["base"], models["target-32001"], tmp_path / "vicuna-7b-delta-v0", progress=False
    )
    out = apply_delta(models["base"], delta, tmp_path / "vicuna-7b", progress=False)
    assert "picks the vicuna_v0 template and vicuna-7b would not" in capsys.readouterr().err
    assert json.loads((out / "vicuna.json").read_text()) == {"conv_template": "vicuna_v0"}
    assert verify_manifest(out, progress=False) == []
    template = pick_template(ModelSettings(model_path=str(out)), load_tokenizer(out), out, out.name)
    assert template.name == "vicuna_v0"

    named = apply_delta(models["base"], delta, tmp_path / "vicuna-7b-v0", progress=False)
    assert not (named / "vicuna.json").exists()  # its name says v0 itself
    with_own = shutil.copytree(delta, tmp_path / "own" / "vicuna-7b-delta-v0")
    config = json.loads((with_own / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (with_own / "tokenizer_config.json").write_text(json.dumps(config))
    assert not (
        apply_delta(models["base"], with_own, tmp_path / "m", progress=False) / "vicuna.json"
    ).exists()


def test_the_tutorial_s_mix_ups_are_named_before_merging(tmp_path, models):
    """Vicuna v0's delta (32001 rows) and LLaMA (32000) in the wrong places: each is said as what it is."""
    base = models["base"]
    delta = make_delta(base, models["target-32001"], tmp_path / "vicuna 增量", progress=False)
    out = tmp_path / "合并"
    with pytest.raises(VicunaError) as swapped:
        apply_delta(delta, base, out, progress=False)
    assert str(swapped.value).startswith(f"--base and --delta are swapped: {delta} holds delta weights (")
    assert str(swapped.value).endswith(f"pass --base {base} --delta '{delta}'")
    with pytest.raises(
        VicunaError, match=rf"--delta {models['target']} is a whole model, not delta weights \(its final"
    ):
        apply_delta(base, models["target"], out, progress=False)
    with pytest.raises(VicunaError, match=rf"--base {re.escape(str(delta))} holds delta weights too"):
        apply_delta(delta, delta, out, progress=False)
    assert not out.exists() and not out.with_name("合并.partial").exists()


def test_an_output_folder_that_is_an_input_or_inside_one_is_refused(tmp_path, models, capsys):
    """`--target` naming the base (downloaded, so with its SHA256SUMS) was refused as a finished folder "to
    delete", the base itself; one inside the base was written there, and the base failed `vicuna verify`."""
    from vicuna.weights.manifest import write_manifest

    base = write_manifest(shutil.copytree(models["base"], tmp_path / "llama-7b-hf"), progress=False).parent
    delta = models["delta"]
    for flags, said in (
        (
            ["apply", "--base", base, "--delta", delta, "--target", base],
            f"--target {base} is the --base folder",
        ),
        (["apply", "--base", base, "--delta", delta, "--target", base / "m"], "is inside the --base folder"),
        (
            ["apply", "--base", base, "--delta", delta, "--target", tmp_path],
            f"--target {tmp_path} holds the --base",
        ),
        (
            ["make", "--base", base, "--target", models["target"], "--delta", base],
            f"--delta {base} is the --base",
        ),
    ):
        assert main(["delta", *map(str, flags), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert said in err and "choose a new folder" in err and "delete" not in err
    assert not list(tmp_path.glob("*.partial"))
    assert verify_manifest(base, progress=False) == []


def test_make_refuses_the_same_folder_as_base_and_target(tmp_path, models):
    """It wrote a delta of zeros, which applied gives the base back, and said it was done."""
    base = models["base"]
    with pytest.raises(VicunaError, match="--base and --target are the same folder .*all zeros"):
        make_delta(
            base, base.parent / ".." / base.parent.name / base.name, tmp_path / "delta", progress=False
        )
    assert not (tmp_path / "delta").exists()


def test_a_delta_cloned_without_git_lfs_says_to_pull_it(tmp_path, models):
    delta = shutil.copytree(models["delta"], tmp_path / "vicuna-7b-delta-v1.1")
    shard = next(delta.glob("*.safetensors"))
    shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(VicunaError, match=rf"{re.escape(str(shard))} is a Git LFS pointer .*git lfs pull"):
        apply_delta(models["base"], delta, tmp_path / "out", progress=False)
