"""`vicuna get` end to end on tiny models: local and fake-Hub (127.0.0.1) sources, the merge, the manifest, the
smoke chat that must end on EOS, and re-runs after interruptions."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from tests.weights.test_hub import FakeHub
from vicuna.cli import main
from vicuna.weights.disk import size as disk_size

EOS = 2


def write_scripted(
    out: Path, base: Path, default: int, chain: tuple[int, ...] | list[int] = (), seed: int = 1
) -> Path:
    """A copy of the tiny LLaMA `base`, every weight changed, whose greedy next token depends only on the current
    one: after chain[i] comes chain[i + 1], after any other token `default`. The attention and MLP outputs are
    zeroed, so the residual stream is the current token's embedding: coordinate 0 is large for every token and
    read by lm_head's row `default`; coordinate i + 1 is larger still for chain[i] and read by chain[i + 1]'s."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    state = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in state.items():
        tensor.add_(torch.randn(tensor.shape, generator=generator), alpha=0.01)
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor.zero_()
    embed, head = state["model.embed_tokens.weight"], state["lm_head.weight"]
    embed[:, 0] = 10.0
    head.zero_()
    head[default, 0] = 1.0
    for i, (token, following) in enumerate(zip(chain, chain[1:], strict=False)):
        embed[token, i + 1] = 20.0
        head[following, i + 1] = 1.0
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def write_delta(base: Path, target: Path, out: Path) -> Path:
    """Vicuna's delta format computed here, independently of `vicuna delta make`: target - base, with the
    target's config and tokenizer."""
    from safetensors.torch import load_file, save_file

    base_state, target_state = load_file(base / "model.safetensors"), load_file(target / "model.safetensors")
    shutil.copytree(target, out, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(
        {k: v - base_state[k] for k, v in target_state.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("get")
    base = tiny_llama_dir
    from transformers import AutoTokenizer

    from vicuna.conversation import Message, VicunaV11, render
    from vicuna.weights.get import SMOKE_QUESTION

    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt_end = tokenizer(render(VicunaV11(), [Message("user", SMOKE_QUESTION)])).input_ids[-1]
    paris = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" Paris"))
    # replies "Paris" and stops; the other one repeats token 5 for ever
    target = write_scripted(root / "target", base, EOS, [prompt_end, *paris])
    never = write_scripted(root / "never", base, 5)
    return {
        "base": base,
        "target": target,
        "delta": write_delta(base, target, root / "delta"),
        "never-delta": write_delta(base, never, root / "never-delta"),
    }


def assert_same_weights(a: Path, b: Path) -> None:
    import torch
    from safetensors.torch import load_file

    merged = {}
    for shard in a.glob("*.safetensors"):
        merged.update(load_file(shard))
    reference = load_file(b / "model.safetensors")
    assert merged.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)


def get(workdir: Path, base, delta, *extra: str, name: str = "my-vicuna") -> int:
    return main(["get", name, "--dir", str(workdir), "--base", str(base), "--delta", str(delta), *extra])


def test_local_base_and_delta(models, tmp_path, capsys):
    workdir = tmp_path / "模型 目录"  # the printed command must work when pasted
    assert get(workdir, models["base"], models["delta"]) == 0
    out, err = capsys.readouterr()
    model = workdir / "my-vicuna"
    assert_same_weights(model, models["target"])
    from vicuna.weights.manifest import verify_manifest

    assert verify_manifest(model) == []
    assert "reply: 'Paris' (ended on EOS)" in err and "reply:" not in out  # the steps: on stderr
    assert f"vicuna chat --model-path '{model}'" in out
    assert not (workdir / "downloads").exists()  # local folders are used where they are


def test_standard_output_holds_the_model_and_the_command_to_chat_with_it_alone(models, tmp_path):
    """`vicuna get ... > get.out` or `$(vicuna get ...)`: each step ("[NAME] merging ...", "verifying",
    the smoke chat's reply, the downloads that may go) came on standard output before the result."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "vicuna", "get", "my-vicuna", "--dir", str(tmp_path), "--no-smoke-test"]
    command += ["--base", str(models["base"]), "--delta", str(models["delta"]), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ)
    assert done.returncode == 0, done.stderr
    model = tmp_path / "my-vicuna"
    assert done.stdout == f"\nready: {model}\nchat with it:\n  vicuna chat --model-path {model}\n"
    assert f"[my-vicuna] merging {models['delta']} into {models['base']}" in done.stderr


def test_no_progress_draws_no_bar_for_the_smoke_chat(models, tmp_path, capsys):
    """`vicuna get ... --no-progress > get.log 2>&1` still drew transformers' "Loading weights" bar, a line
    redrawn with carriage returns, as the smoke chat loaded the model."""
    assert get(tmp_path, models["base"], models["delta"], "--no-progress") == 0
    captured = capsys.readouterr()
    assert "reply: 'Paris' (ended on EOS)" in captured.err
    assert "Loading weights" not in captured.err and "\r" not in captured.err


def test_rerun_after_interrupted_merge_and_smoke_chat(models, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    from vicuna.weights import delta as delta_module
    from vicuna.weights import get as get_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # killed while writing the merged weights
        patch.setattr(safetensors.torch, "save_file", interrupted)
        assert get(tmp_path, models["base"], models["delta"]) == 130
    assert not (tmp_path / "my-vicuna" / "SHA256SUMS").exists()

    with monkeypatch.context() as patch:  # killed during the smoke chat: the merge is done by then
        patch.setattr(get_module, "smoke_chat", lambda *a, **k: interrupted())
        assert get(tmp_path, models["base"], models["delta"]) == 130
    assert (tmp_path / "my-vicuna" / "SHA256SUMS").is_file()

    calls = []
    real_apply = delta_module.apply_delta
    monkeypatch.setattr(delta_module, "apply_delta", lambda *a, **k: calls.append(a) or real_apply(*a, **k))
    capsys.readouterr()
    assert get(tmp_path, models["base"], models["delta"]) == 0
    assert calls == []  # the finished merge was kept
    assert "(ended on EOS)" in capsys.readouterr().err
    assert_same_weights(tmp_path / "my-vicuna", models["target"])


def test_changed_merged_file_is_caught(models, tmp_path, capsys):
    assert get(tmp_path, models["base"], models["delta"], "--no-smoke-test") == 0
    config = tmp_path / "my-vicuna" / "config.json"
    config.write_text(config.read_text().replace("64", "65"))
    assert get(tmp_path, models["base"], models["delta"]) == 2
    err = capsys.readouterr().err
    assert "does not match its SHA256SUMS" in err and "config.json" in err


def test_smoke_chat_that_never_ends_on_eos(models, tmp_path, capsys):
    assert get(tmp_path, models["base"], models["never-delta"], "--max-new-tokens", "6") == 2
    err = capsys.readouterr().err
    assert "did not end on EOS '</s>' within 6 tokens" in err


def test_smoke_chat_with_a_wrong_eos_in_the_tokenizer(models, tmp_path, capsys):
    delta = shutil.copytree(models["delta"], tmp_path / "delta")
    import json

    config = json.loads((delta / "config.json").read_text())
    config["eos_token_id"] = 3
    (delta / "config.json").write_text(json.dumps(config))
    (delta / "generation_config.json").unlink(missing_ok=True)
    assert get(tmp_path, models["base"], delta) == 2
    err = capsys.readouterr().err
    assert "the tokenizer's EOS id is 2 but the model's eos_token_id is [3]" in err


def _serve(monkeypatch, repos: dict[str, Path]) -> FakeHub:
    hub = FakeHub(
        {
            repo: {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
            for repo, folder in repos.items()
        }
    )
    threading.Thread(target=hub.serve_forever, args=(0.05,), daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return hub


def test_base_from_the_hub_and_rerun_downloads_nothing(models, tmp_path, monkeypatch):
    hub = _serve(monkeypatch, {"org/llama-tiny": models["base"]})
    try:
        assert get(tmp_path, "org/llama-tiny", models["delta"], "--no-smoke-test") == 0
        downloaded = tmp_path / "downloads" / "org--llama-tiny"
        assert (downloaded / "model.safetensors").read_bytes() == (
            models["base"] / "model.safetensors"
        ).read_bytes()
        assert_same_weights(tmp_path / "my-vicuna", models["target"])
        hub.log.clear()
        assert get(tmp_path, "org/llama-tiny", models["delta"], "--no-smoke-test") == 0
        assert hub.log == []  # every step was already done: not even the Hub is asked
    finally:
        hub.shutdown()
        hub.server_close()


def test_no_progress_draws_no_bar_of_the_download_on_a_terminal(models, tmp_path, monkeypatch, capsys):
    """`vicuna get --no-progress` on a terminal still drew the Hub download's bars and its hash check's."""
    hub = _serve(monkeypatch, {"org/llama-tiny": models["base"]})
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # bars where they would be drawn
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # on a terminal, as rich sees it
    try:
        assert get(tmp_path, "org/llama-tiny", models["delta"], "--no-smoke-test", "--no-progress") == 0
    finally:
        hub.shutdown()
        hub.server_close()
    out, err = capsys.readouterr()
    assert "[my-vicuna] downloading the base: org/llama-tiny" in err and " files, " in err  # lines, not bars
    assert "\r" not in err and "━" not in err and "%|" not in err and out.startswith("\nready: ")


def test_delta_apply_of_a_hub_delta_as_fastchat_took_it_gives_the_get_command_that_works(
    models, tmp_path, monkeypatch, capsys
):
    """FastChat's README merges `--delta-path lmsys/vicuna-7b-delta-v1.1`, downloaded as it merges; `delta
    apply` said only 'lmsys/vicuna-7b-delta-v1.1 is not a folder'."""
    import shlex

    monkeypatch.chdir(tmp_path)
    shutil.copytree(models["base"], tmp_path / "llama-7b-hf")
    typed = "delta apply --base llama-7b-hf --delta lmsys/vicuna-tiny-delta --target models/vicuna-tiny"
    assert main([*typed.split(), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    said = "vicuna get vicuna-tiny --dir models --base llama-7b-hf --delta lmsys/vicuna-tiny-delta"
    assert err == (
        "error: --delta lmsys/vicuna-tiny-delta: no such folder here; to download from the Hugging Face Hub "
        f"and merge in one step: {said}"
    )
    hub = _serve(monkeypatch, {"lmsys/vicuna-tiny-delta": models["delta"]})
    try:
        assert main([*shlex.split(said)[1:], "--no-smoke-test", "--no-progress"]) == 0
    finally:
        hub.shutdown()
        hub.server_close()
    assert_same_weights(tmp_path / "models" / "vicuna-tiny", models["target"])


def test_the_downloads_a_merge_no_longer_needs_are_said_and_may_be_deleted(
    models, tmp_path, monkeypatch, capsys
):
    """The base and delta `vicuna get` fetched stayed beside the merged model, as big as it or bigger,
    without a word that they may go."""
    hub = _serve(monkeypatch, {"org/llama-tiny": models["base"]})
    try:
        assert get(tmp_path, "org/llama-tiny", models["delta"], "--no-smoke-test") == 0
        downloaded = tmp_path / "downloads" / "org--llama-tiny"
        held = sum(p.stat().st_size for p in downloaded.rglob("*") if p.is_file())
        out = capsys.readouterr().err
        assert (
            f"[my-vicuna] the downloads merged from ({disk_size(held)}) are not needed by {tmp_path / 'my-vicuna'}; "
            f"to free the disk, delete {downloaded} (this command run again does not fetch them while the model "
            "is there)"
        ) in out
        shutil.rmtree(downloaded)  # as said: the model stays ready, and nothing is fetched again
        hub.log.clear()
        assert get(tmp_path, "org/llama-tiny", models["delta"], "--no-smoke-test") == 0
        assert hub.log == [] and "downloads merged from" not in capsys.readouterr().err
        assert_same_weights(tmp_path / "my-vicuna", models["target"])
    finally:
        hub.shutdown()
        hub.server_close()
    assert get(tmp_path / "local", models["base"], models["delta"], "--no-smoke-test") == 0
    assert "downloads merged from" not in capsys.readouterr().err  # the user's own folders are not offered


def test_merged_release_recipe(models, tmp_path, monkeypatch, capsys):
    hub = _serve(monkeypatch, {"lmsys/vicuna-7b-v1.5": models["target"]})
    try:
        assert main(["get", "vicuna-7b-v1.5", "--dir", str(tmp_path)]) == 0
        model = tmp_path / "vicuna-7b-v1.5"
        assert (model / "model.safetensors").read_bytes() == (
            models["target"] / "model.safetensors"
        ).read_bytes()
        assert (model / "SHA256SUMS").is_file()
        out, err = capsys.readouterr()
        assert "(ended on EOS)" in err and f"--model-path {model}" in out
    finally:
        hub.shutdown()
        hub.server_close()


def test_offline_get_says_where_a_download_brought_in_goes_and_then_uses_it(
    models, tmp_path, monkeypatch, capsys
):
    """With HF_HUB_OFFLINE=1, get said huggingface_hub's 'Cannot reach ...: offline mode is enabled' of the
    first repository it lacked. It names each one missing and where its download, made on a machine with
    network and copied in, goes; then uses it, asking nothing of the Hub."""
    from huggingface_hub import constants

    hub = _serve(monkeypatch, {"lmsys/vicuna-7b-v1.5": models["target"]})
    try:
        elsewhere = tmp_path / "elsewhere" / "vicuna-7b-v1.5"  # on a machine with network
        assert main(["download", "lmsys/vicuna-7b-v1.5", "--dir", str(elsewhere)]) == 0
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        hub.log.clear()
        here = tmp_path / "here"
        assert main(["get", "vicuna-7b-v1.5", "--dir", str(here)]) == 2
        assert (
            "`vicuna download lmsys/vicuna-7b-v1.5 --dir vicuna-7b-v1.5` fetches it; copy that folder here as "
            f"{here / 'vicuna-7b-v1.5'}\n"
        ) in capsys.readouterr().err
        shutil.copytree(elsewhere, here / "vicuna-7b-v1.5")
        assert main(["get", "vicuna-7b-v1.5", "--dir", str(here)]) == 0
        assert "(ended on EOS)" in capsys.readouterr().err
        assert get(here, "org/base", "org/delta") == 2
        err = capsys.readouterr().err
        for repo_id in ("org/base", "org/delta"):
            assert (
                f"{repo_id} is not downloaded into {here / 'downloads' / repo_id.replace('/', '--')}" in err
            )
        assert hub.log == []
    finally:
        hub.shutdown()
        hub.server_close()


def test_interrupted_merged_release_does_not_look_finished(models, tmp_path, monkeypatch):
    from vicuna.weights import hub as hub_module

    hub = _serve(monkeypatch, {"lmsys/vicuna-7b-v1.5": models["target"]})
    model = tmp_path / "vicuna-7b-v1.5"
    try:
        with monkeypatch.context() as patch:  # killed after the files came, before they were checked

            def interrupted(*args, **kwargs):
                raise KeyboardInterrupt

            patch.setattr(hub_module, "check_files", interrupted)
            assert main(["get", "vicuna-7b-v1.5", "--dir", str(tmp_path), "--no-smoke-test"]) == 130
        assert not model.exists()  # no folder with a config and weights that is not complete and checked
        hub.log.clear()
        assert main(["get", "vicuna-7b-v1.5", "--dir", str(tmp_path), "--no-smoke-test"]) == 0
        assert hub.downloads() == []  # the files already fetched were kept
        assert (model / "SHA256SUMS").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["vicuna-7b-v1.5"]
    finally:
        hub.shutdown()
        hub.server_close()


def test_bad_requests(models, tmp_path, capsys):
    assert main(["get", "vicuna-99b", "--dir", str(tmp_path)]) == 2
    assert "unknown model 'vicuna-99b': choose one of vicuna-7b-v1.1" in capsys.readouterr().err
    assert main(["get", "vicuna-7b-v1.5", "--dir", str(tmp_path), "--base", str(models["base"])]) == 2
    assert "merged release" in capsys.readouterr().err
    assert get(tmp_path, tmp_path / "no" / "such" / "folder", models["delta"]) == 2
    assert "is neither an existing folder nor a Hub repo id" in capsys.readouterr().err


def test_refuses_when_the_disk_is_too_small(models, tmp_path, monkeypatch, capsys):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    assert get(tmp_path, models["base"], models["delta"]) == 2
    assert "getting my-vicuna needs" in capsys.readouterr().err
    assert not (tmp_path / "my-vicuna").exists()


def test_an_older_vicunas_unfinished_files_are_deleted_before_get_s_disk_check(
    models, tmp_path, monkeypatch, capsys
):
    """`vicuna download` deletes what an older vicuna's killed download left in
    `.cache/huggingface/download/*.incomplete` before its free-disk check, so that a disk they filled is
    cleaned, not refused; `vicuna get` checked the disk for all its steps first, and refused it still."""
    folder = tmp_path / "downloads" / "org--llama-tiny"  # where get downloads the base
    stale = folder / ".cache" / "huggingface" / "download" / "model.safetensors.a1b2.incomplete"
    stale.parent.mkdir(parents=True)
    room = 64 * 2**20  # more than the download and the merge need (a sparse file: no disk used)
    with stale.open("wb") as f:
        f.truncate(room)
    real = shutil.disk_usage
    # a full disk: its only room is what the stale file held, once deleted
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=0 if stale.exists() else room))
    hub = _serve(monkeypatch, {"org/llama-tiny": models["base"]})
    try:
        assert get(tmp_path, "org/llama-tiny", models["delta"], "--no-smoke-test") == 0, capsys.readouterr()
        assert not stale.exists()
        assert_same_weights(tmp_path / "my-vicuna", models["target"])
    finally:
        hub.shutdown()
        hub.server_close()


def test_rerun_with_another_base_is_refused_not_answered_with_the_old_merge(models, tmp_path, capsys):
    wrong = write_scripted(tmp_path / "wrong-base", models["base"], 5, seed=7)  # same shapes, other weights
    assert get(tmp_path, wrong, models["delta"], "--max-new-tokens", "6") == 2
    err = capsys.readouterr().err
    assert "did not end on EOS" in err and f"merged model stays in {tmp_path / 'my-vicuna'}" in err

    assert get(tmp_path, models["base"], models["delta"]) == 2
    err = capsys.readouterr().err
    assert f"the base was {wrong.resolve()}, now {models['base'].resolve()}" in err
    assert "delete" in err

    shutil.rmtree(tmp_path / "my-vicuna")
    assert get(tmp_path, models["base"], models["delta"]) == 0
    assert_same_weights(tmp_path / "my-vicuna", models["target"])


def test_a_merge_killed_as_it_finished_still_records_its_inputs(models, tmp_path, monkeypatch, capsys):
    """The merged model and the record of what it was merged from appear together: killed in between, a
    re-run with another base would take the old merge for its own."""
    from vicuna.weights import delta as delta_module

    real_apply = delta_module.apply_delta

    def killed_once_merged(*args, **kwargs):
        real_apply(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(delta_module, "apply_delta", killed_once_merged)
        assert get(tmp_path, models["base"], models["delta"], "--no-smoke-test") == 130
    assert (tmp_path / "my-vicuna" / "SHA256SUMS").is_file()
    wrong = write_scripted(tmp_path / "wrong-base", models["base"], 5, seed=7)
    capsys.readouterr()
    assert get(tmp_path, wrong, models["delta"], "--no-smoke-test") == 2
    assert f"the base was {models['base'].resolve()}, now {wrong.resolve()}" in capsys.readouterr().err


def test_rerun_after_the_base_weights_changed_is_refused(models, tmp_path, capsys):
    base = shutil.copytree(models["base"], tmp_path / "base")
    assert get(tmp_path, base, models["delta"], "--no-smoke-test") == 0
    assert get(tmp_path, base, models["delta"], "--no-smoke-test") == 0  # same inputs: nothing to do
    write_scripted(tmp_path / "other", models["base"], 5, seed=7)
    shutil.copyfile(tmp_path / "other" / "model.safetensors", base / "model.safetensors")
    assert get(tmp_path, base, models["delta"], "--no-smoke-test") == 2
    assert "its weights have changed since" in capsys.readouterr().err


def test_merged_release_resumes_an_older_unfinished_download_in_the_model_folder(
    models, tmp_path, monkeypatch
):
    # before downloads went into NAME.partial, an interrupted one left its files in NAME itself: the
    # rename of the finished NAME.partial onto it failed ('Directory not empty')
    hub = _serve(monkeypatch, {"lmsys/vicuna-7b-v1.5": models["target"]})
    model = tmp_path / "vicuna-7b-v1.5"
    model.mkdir()
    shutil.copyfile(models["target"] / "config.json", model / "config.json")
    try:
        assert main(["get", "vicuna-7b-v1.5", "--dir", str(tmp_path), "--no-smoke-test"]) == 0
        assert (model / "SHA256SUMS").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["vicuna-7b-v1.5"]
    finally:
        hub.shutdown()
        hub.server_close()


def test_a_base_where_the_merge_goes_is_not_taken_for_the_finished_merge(models, tmp_path, capsys):
    """`get NAME --dir D --base D/NAME`: the base (with the SHA256SUMS `vicuna download` gave it) lies where
    the merge goes; only a folder with get's record of its inputs is a finished merge, not any with a manifest."""
    from vicuna.weights.manifest import write_manifest

    base = shutil.copytree(models["base"], tmp_path / "my-vicuna")
    write_manifest(base, progress=False)
    assert get(tmp_path, base, models["delta"], "--no-smoke-test") == 2
    captured = capsys.readouterr()
    assert "ready" not in captured.out
    assert (
        f"{base} is the base itself, where the merge would go" in captured.err
        and "another name or --dir" in captured.err
    )

    other = tmp_path / "elsewhere"  # a model with a manifest, not get's merge, where the merge goes
    other.mkdir()
    base.rename(other / "my-vicuna")
    assert get(other, models["base"], models["delta"], "--no-smoke-test") == 2
    captured = capsys.readouterr()
    assert "ready" not in captured.out and f"{other / 'my-vicuna'} already exists" in captured.err


def test_a_v0_model_s_smoke_chat_is_asked_in_v0_s_format_and_may_end_on_its_stop_text(
    models, tmp_path, capsys
):
    """Vicuna v0 ends its replies with '###', not EOS: the smoke chat asked every model in v1.1's format and
    required EOS, so a good v0 merge was reported as a wrong base or delta."""
    from transformers import AutoTokenizer

    from vicuna.conversation import Message, VicunaV0, render
    from vicuna.weights.get import SMOKE_QUESTION

    tokenizer = AutoTokenizer.from_pretrained(models["base"])
    prompt_end = tokenizer(render(VicunaV0(), [Message("user", SMOKE_QUESTION)])).input_ids[-1]
    reply = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" Paris ###"))
    v0 = write_scripted(tmp_path / "v0", models["base"], 5, [prompt_end, *reply])  # then runs on
    delta = write_delta(models["base"], v0, tmp_path / "vicuna-tiny-delta-v0")
    assert get(tmp_path / "out", models["base"], delta) == 0
    assert "reply: 'Paris' (ended on '###')" in capsys.readouterr().err
