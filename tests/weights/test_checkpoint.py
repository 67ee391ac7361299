"""Reading checkpoint folders tensor by tensor (safetensors and `.bin`, with and without index) and writing
sharded safetensors through a staging folder; also the peak-RSS helper the convert and delta tests use."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import save_file

from vicuna.errors import VicunaError
from vicuna.shell import quote
from vicuna.weights import checkpoint
from vicuna.weights.checkpoint import CheckpointReader, TensorSpec, plan_shards, side_files, write_checkpoint
from vicuna.weights.manifest import MANIFEST_NAME, verify_manifest

# Run in a fresh interpreter: import what the job needs, note the idle RSS, run the job, report the peak.
# The peak is VmHWM (this process's own high-water mark): getrusage's ru_maxrss keeps the parent's peak
# across fork and exec, so it would report pytest's memory.
_RSS_PROBE = """
import json, re, sys
import psutil, torch, safetensors.torch
{preload}
from pathlib import Path
idle = psutil.Process().memory_info().rss
{job}
status = Path("/proc/self/status").read_text()
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024
print(json.dumps({{"idle": idle, "peak": peak}}))
"""


def peak_rss_above_idle(job: str, *args: str, preload: str = "") -> int:
    """Bytes by which the peak RSS of `job` (Python code; sys.argv[1:] are `args`) exceeds its idle RSS,
    measured after torch, safetensors and `preload` (import statements) are imported."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux's /proc/self/status for the peak RSS")
    done = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE.format(job=job, preload=preload), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"peak RSS above idle: {(report['peak'] - report['idle']) / 1e6:.0f} MB")
    return report["peak"] - report["idle"]


def random_state(names_shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype=torch.float32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in names_shapes.items()}


STATE_SHAPES = {f"layer.{i}.weight": (8, 4 + i) for i in range(6)}
UNIFORM_SHAPES = {f"layer.{i}.weight": (8, 4) for i in range(6)}  # 128 bytes each: two per 256-byte shard


def save_folder(state: dict, folder: Path, *, kind: str, files: int, index: bool) -> Path:
    """Save `state` as `files` shards of safetensors or torch `.bin`, with or without an index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    groups = [names[i::files] for i in range(files)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        stem = "model" if kind == "safetensors" else "pytorch_model"
        file = f"{stem}-{i:05d}-of-{files:05d}.{kind}" if files > 1 else f"{stem}.{kind}"
        part = {n: state[n].contiguous() for n in group}
        if kind == "safetensors":
            save_file(part, str(folder / file), metadata={"format": "pt"})
        else:
            torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(group, file))
    if index:
        index_name = (
            "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
        )
        (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    ("kind", "files", "index"),
    [
        ("safetensors", 1, False),
        ("safetensors", 3, True),
        ("safetensors", 2, False),
        ("bin", 1, False),
        ("bin", 2, True),
    ],
)
def test_reader_reads_every_layout(tmp_path, kind, files, index):
    state = random_state(STATE_SHAPES)
    reader = CheckpointReader(save_folder(state, tmp_path / "ckpt", kind=kind, files=files, index=index))
    assert sorted(reader.names) == sorted(state)
    assert len(reader.files) == files
    for name, tensor in state.items():
        assert reader.specs[name] == TensorSpec(name, tuple(tensor.shape), torch.float32)
        assert torch.equal(reader.get(name), tensor)
    assert reader.nbytes == sum(t.numel() * 4 for t in state.values())


def test_reader_prefers_safetensors_and_skips_rotary_buffers(tmp_path):
    state = random_state(STATE_SHAPES)
    folder = save_folder(state, tmp_path / "ckpt", kind="safetensors", files=1, index=False)
    torch.save({"junk": torch.zeros(1)}, folder / "pytorch_model.bin")
    save_file(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2)}, str(folder / "extra.safetensors")
    )
    reader = CheckpointReader(folder)
    assert sorted(reader.names) == sorted(state)


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(VicunaError, match="is not a folder"):
        CheckpointReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VicunaError, match="no weights in"):
        CheckpointReader(tmp_path / "empty")

    folder = save_folder(random_state(STATE_SHAPES), tmp_path / "a", kind="safetensors", files=1, index=False)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(VicunaError, match=r"model\.safetensors.*damaged or incomplete"):
        CheckpointReader(folder)
    (folder / "model.safetensors").write_bytes(data[:50])  # inside its header: said as such
    with pytest.raises(
        VicunaError, match=r"model\.safetensors: cut short: 50 bytes on disk, where its header"
    ):
        CheckpointReader(folder)
    (folder / "model.safetensors").write_bytes(b"<!DOCTYPE html>" * 10)  # other bytes: not said cut short
    with pytest.raises(VicunaError, match=r"model\.safetensors.*damaged or incomplete"):
        CheckpointReader(folder)

    folder = save_folder(random_state(STATE_SHAPES), tmp_path / "b", kind="bin", files=1, index=False)
    (folder / "pytorch_model.bin").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(VicunaError, match=r"pytorch_model\.bin: it starts with b'no', neither a zip"):
        CheckpointReader(folder)
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(VicunaError, match=r"pytorch_model\.bin: it is empty \(0 bytes\)"):
        CheckpointReader(folder)

    folder = save_folder(random_state(STATE_SHAPES), tmp_path / "c", kind="safetensors", files=3, index=True)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(VicunaError, match=r"lists model-00002-of-00003\.safetensors"):
        CheckpointReader(folder)

    # a single-file model saved into a sharded model's folder: transformers would load one, an index reader the other
    folder = save_folder(random_state(STATE_SHAPES), tmp_path / "d", kind="safetensors", files=3, index=True)
    save_file({"x": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(VicunaError, match=r"holds model\.safetensors and model\.safetensors\.index\.json"):
        CheckpointReader(folder)
    from vicuna.engine.loader import weight_files

    with pytest.raises(VicunaError, match="two checkpoints in one folder"):
        weight_files(folder)


def test_a_shard_the_index_lists_but_the_folder_lacks_says_how_to_fetch_it(tmp_path, monkeypatch):
    """A shard missing from a downloaded folder was named, and no more: the error now says which download
    fetches it again (only the missing files), as far as the folder's name tells."""
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "home"))

    def missing_shard(folder: Path) -> Path:
        save_folder(random_state(STATE_SHAPES), folder, kind="safetensors", files=3, index=True)
        (folder / "model-00002-of-00003.safetensors").unlink()
        return folder

    folder = missing_shard(
        tmp_path / "home" / "models" / "lmsys--vicuna-7b-v1.5"
    )  # where `vicuna download` puts it
    with pytest.raises(
        VicunaError,
        match=r"lists model-00002-of-00003\.safetensors.*`vicuna download lmsys/vicuna-7b-v1\.5` fetches it",
    ):
        CheckpointReader(folder)
    folder = missing_shard(tmp_path / "downloads" / "yahma--llama-7b-hf")  # where `vicuna get` puts a base
    with pytest.raises(
        VicunaError, match=re.escape(f"`vicuna download yahma/llama-7b-hf --dir {folder}` fetches it")
    ):
        CheckpointReader(folder)
    folder = missing_shard(tmp_path / "my model")  # a name that does not say the repo
    with pytest.raises(
        VicunaError, match=re.escape(f"`vicuna download REPO_ID --dir {quote(str(folder))}` fetches")
    ):
        CheckpointReader(folder)


def test_reader_release_gives_back_the_pages_it_read(tmp_path):
    """The mechanism that bounds memory: mapped pages count in RSS until release() drops the mappings."""
    shapes = {f"t{i}": (1024, 1024) for i in range(24)}  # 96 MiB of float32
    folder = save_folder(random_state(shapes), tmp_path / "big", kind="safetensors", files=2, index=True)
    reader = CheckpointReader(folder)
    size = reader.nbytes
    process = psutil.Process()
    before = process.memory_info().rss
    total = 0.0
    for name in reader.names:
        total += float(reader.get(name).sum())
    held = process.memory_info().rss - before
    reader.release()
    after = process.memory_info().rss - before
    assert held > 0.8 * size
    assert after < 0.2 * size


def test_plan_shards_keeps_order_and_limit():
    specs = [TensorSpec(f"t{i}", (10,), torch.float32) for i in range(10)]  # 40 bytes each
    plan = plan_shards(specs, max_shard_bytes=100)
    assert list(plan) == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    assert [s.name for group in plan.values() for s in group] == [s.name for s in specs]
    assert all(len(group) == 2 for group in plan.values())


def _write(out: Path, state: dict, *, make=None, fingerprint="same", max_shard_bytes=256) -> Path:
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in state.items()]
    return write_checkpoint(
        out,
        specs,
        make or (lambda spec: state[spec.name]),
        fingerprint=fingerprint,
        release=lambda: None,
        extras=lambda folder: (folder / "config.json").write_text("{}"),
        description="test",
        progress=False,
        max_shard_bytes=max_shard_bytes,
    )


def _interrupted_at_the_third_shard(out: Path, state: dict) -> None:
    """A `_write` of `state` (UNIFORM_SHAPES: three shards) stopped as its third shard is made."""

    def failing(spec):
        if spec.name == "layer.4.weight":
            raise KeyboardInterrupt
        return state[spec.name]

    with pytest.raises(KeyboardInterrupt):
        _write(out, state, make=failing)


def test_verify_after_an_interruption_says_to_rerun_the_job(tmp_path, capsys):
    """`vicuna verify OUT` after Ctrl-C answered "OUT is not a folder", and on OUT.partial that it has no
    manifest: neither said that the job was interrupted and that a rerun finishes it."""
    from vicuna.cli import main

    out = tmp_path / "llama-7b-hf"
    _interrupted_at_the_third_shard(out, random_state(UNIFORM_SHAPES))
    assert main(["verify", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{out} does not exist yet: {out}.partial holds the interrupted job that makes it" in err
    assert "run the same command (convert, delta apply, get) again to finish it" in err
    assert main(["verify", f"{out}.partial", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{out}.partial is an unfinished job's folder" in err and err.rstrip().endswith(
        f"then verify {out}"
    )


def test_writer_makes_an_indexed_folder_with_manifest(tmp_path):
    state = random_state(UNIFORM_SHAPES)
    out = _write(tmp_path / "out", state)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f"model-0000{i}-of-00003.safetensors" for i in range(1, 4)), "model.safetensors.index.json"]
        + ["config.json", MANIFEST_NAME]
    )
    assert not (tmp_path / "out.partial").exists()
    assert verify_manifest(out, progress=False) == []
    reader = CheckpointReader(out)
    assert all(torch.equal(reader.get(n), t) for n, t in state.items())
    assert [p.name for p in side_files(out)] == ["config.json"]
    with pytest.raises(VicunaError, match=r"already exists, finished \(`vicuna verify .*` checks it\)"):
        _write(out, state)
    (out / MANIFEST_NAME).unlink()  # not this writer's finished folder
    with pytest.raises(
        VicunaError, match=r"out already exists and holds config\.json, model-00001-of-00003\.safe"
    ):
        _write(out, state)
    # a folder of other models, given as where to put the result: not to be deleted, as was said
    (tmp_path / "models" / "llama-7b-hf").mkdir(parents=True)
    with pytest.raises(VicunaError) as taken:
        _write(tmp_path / "models", state)
    assert str(taken.value) == (
        f"{tmp_path / 'models'} already exists and holds llama-7b-hf: the output needs a new folder of its own "
        "(it is made for you); choose another name"
    )


def test_writer_resumes_and_restarts_when_inputs_change(tmp_path):
    state = random_state(UNIFORM_SHAPES)
    made = []

    def failing(spec):
        if spec.name == "layer.4.weight":
            raise KeyboardInterrupt
        made.append(spec.name)
        return state[spec.name]

    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "out", state, make=failing)
    assert not (tmp_path / "out").exists()
    staging = tmp_path / "out.partial"
    assert not (staging / MANIFEST_NAME).exists()
    written = sorted(p.name for p in staging.glob("*.safetensors"))
    assert written == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"]

    made.clear()
    _write(tmp_path / "out", state, make=lambda spec: made.append(spec.name) or state[spec.name])
    assert made == ["layer.4.weight", "layer.5.weight"]  # the finished shards were kept
    assert verify_manifest(tmp_path / "out", progress=False) == []

    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "again", state, make=failing)
    made.clear()
    _write(
        tmp_path / "again",
        state,
        make=lambda spec: made.append(spec.name) or state[spec.name],
        fingerprint="new",
    )
    assert made == list(state)  # other inputs: nothing is reused


@pytest.mark.parametrize("damage", ["cut short", "emptied", "other tensors"])
def test_a_resumed_job_makes_a_damaged_kept_shard_again(tmp_path, damage):
    """A shard of the interrupted run that is not whole (a power cut can leave a renamed file empty or cut
    short) or holds other tensors is made again, not kept: kept, the manifest would have hashed it as it
    was, and the finished model verified with a broken shard in it."""
    from safetensors.torch import load_file

    state = random_state(UNIFORM_SHAPES)
    _interrupted_at_the_third_shard(tmp_path / "out", state)
    shard = tmp_path / "out.partial" / "model-00001-of-00003.safetensors"
    if damage == "other tensors":
        save_file({"layer.0.weight": state["layer.0.weight"]}, str(shard))
    else:
        shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2 if damage == "cut short" else 0])
    made = []
    out = _write(tmp_path / "out", state, make=lambda spec: made.append(spec.name) or state[spec.name])
    assert made == ["layer.0.weight", "layer.1.weight", "layer.4.weight", "layer.5.weight"]
    assert verify_manifest(out, progress=False) == []
    for name, tensor in load_file(str(out / "model-00001-of-00003.safetensors")).items():
        assert torch.equal(tensor, state[name])


def test_a_resumed_job_s_bar_starts_at_the_kept_shards(tmp_path, monkeypatch):
    """The bar's rate and time left come from what is advanced: the shards kept from the interrupted run
    are shown done from the start, not advanced as if made in no time (a resumed 5.8 GB convert showed
    386 GB/s)."""
    state = random_state(UNIFORM_SHAPES)

    _interrupted_at_the_third_shard(tmp_path / "out", state)
    bars, progress_bar = [], checkpoint.progress_bar

    @contextlib.contextmanager
    def recorded(description, total, **kw):
        with progress_bar(description, total, **kw) as advance:
            bars.append({"total": total, "done": kw.get("done", 0), "advanced": 0})
            yield lambda n: bars[-1].update(advanced=bars[-1]["advanced"] + n) or advance(n)

    monkeypatch.setattr(checkpoint, "progress_bar", recorded)
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in state.items()]
    write_checkpoint(
        tmp_path / "out",
        specs,
        lambda spec: state[spec.name],
        fingerprint="same",
        release=lambda: None,
        extras=lambda folder: (folder / "config.json").write_text("{}"),
        description="test",
        max_shard_bytes=256,
    )
    kept = sum(s.nbytes for s in specs[:4])  # two shards of two 128-byte tensors
    assert bars == [{"total": 6 * 128, "done": kept, "advanced": 6 * 128 - kept}]


def test_writer_refuses_a_foreign_staging_folder(tmp_path):
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "notes.txt").write_text("mine")
    with pytest.raises(VicunaError, match="was not made by vicuna"):
        _write(tmp_path / "out", random_state(STATE_SHAPES))


def test_each_shard_is_hashed_once_as_it_is_written(tmp_path, monkeypatch):
    from vicuna.weights import manifest

    hashed, sha256_of = [], manifest.sha256_of

    def counted(path, *args):
        hashed.append(Path(path).name)
        return sha256_of(path, *args)

    monkeypatch.setattr(manifest, "sha256_of", counted)  # what the manifest hashes at the end
    monkeypatch.setattr(checkpoint, "sha256_of", counted)  # what the writer hashes as it goes
    given, write_manifest = [], checkpoint.write_manifest
    monkeypatch.setattr(
        checkpoint,
        "write_manifest",
        lambda folder, **kw: given.append(kw["known"]) or write_manifest(folder, **kw),
    )
    out = _write(tmp_path / "out", random_state(UNIFORM_SHAPES))
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == 3 and sorted(given[0]) == shards  # the writer's digests, handed to the manifest
    assert sorted(hashed) == sorted([*shards, "config.json", "model.safetensors.index.json"])
    assert verify_manifest(out, progress=False) == []


def test_a_resumed_job_hashes_the_shards_it_kept_while_it_makes_the_others(tmp_path, monkeypatch):
    """Kept shards are handed to the manifest hashed, like new ones, not read again after the last shard
    (a resumed 5.8 GB delta apply with 3 GB kept took 1.37x as long that way)."""
    state = random_state(UNIFORM_SHAPES)

    _interrupted_at_the_third_shard(tmp_path / "out", state)
    given, write_manifest = [], checkpoint.write_manifest
    monkeypatch.setattr(
        checkpoint,
        "write_manifest",
        lambda folder, **kw: given.append(kw["known"]) or write_manifest(folder, **kw),
    )
    out = _write(tmp_path / "out", state)
    assert sorted(given[0]) == sorted(p.name for p in out.glob("*.safetensors"))  # kept ones included
    assert verify_manifest(out, progress=False) == []


def test_writer_finishes_a_job_interrupted_while_hashing(tmp_path, monkeypatch):
    state = random_state(UNIFORM_SHAPES)
    real_manifest = checkpoint.write_manifest

    def killed(folder, progress=True, known=None):
        (folder / f".{MANIFEST_NAME}.tmp").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "out", state)
    assert not (tmp_path / "out").exists()
    (tmp_path / "out.partial" / ".model-00002-of-00003.safetensors.tmp").write_bytes(b"cut short")

    monkeypatch.setattr(checkpoint, "write_manifest", real_manifest)
    made = []
    out = _write(tmp_path / "out", state, make=lambda spec: made.append(spec.name) or state[spec.name])
    assert made == []
    assert verify_manifest(out, progress=False) == []
    assert not list(out.glob(".*"))  # no plan, no leftovers


def test_a_job_killed_as_it_renamed_its_folder_is_finished_only_by_a_job_of_the_same_inputs(
    tmp_path, monkeypatch
):
    """Killed after its manifest, before `OUT.partial` became `OUT`: a re-run of the same job renames it
    without making anything again, and a job with other inputs (another --base) does not take it for its
    own, which it did while the plan was removed before the rename."""
    import os

    state, rename = random_state(UNIFORM_SHAPES), os.replace

    def killed_at_the_rename(src, dst):
        if Path(dst).name in ("out", "again"):
            raise KeyboardInterrupt
        rename(src, dst)

    for out in (tmp_path / "out", tmp_path / "again"):
        monkeypatch.setattr(os, "replace", killed_at_the_rename)
        with pytest.raises(KeyboardInterrupt):
            _write(out, state)
        monkeypatch.setattr(os, "replace", rename)
        assert (out.with_name(out.name + ".partial") / MANIFEST_NAME).is_file() and not out.exists()

    made = []
    _write(tmp_path / "out", state, make=lambda spec: made.append(spec.name) or state[spec.name])
    assert made == [] and verify_manifest(tmp_path / "out", progress=False) == []
    assert not list((tmp_path / "out").glob(".*"))  # its plan removed once renamed
    other = {name: t + 1 for name, t in state.items()}
    _write(
        tmp_path / "again",
        other,
        make=lambda spec: made.append(spec.name) or other[spec.name],
        fingerprint="new",
    )
    assert made == list(state)  # made again, from the new inputs
    assert torch.equal(CheckpointReader(tmp_path / "again").get("layer.0.weight"), other["layer.0.weight"])


def test_a_resumed_job_removes_the_file_safetensors_was_writing_when_killed(tmp_path, monkeypatch):
    """safetensors writes a shard to a `.tmpXXXXXX` file beside it and renames it when done: killed in between
    (SIGKILL, a power cut), that file stays in the staging folder, and was carried into the finished folder."""
    import safetensors.torch

    state, real_save = random_state(UNIFORM_SHAPES), safetensors.torch.save_file

    def killed_on_the_second_shard(tensors, filename, metadata=None):
        if "00002" not in filename:
            return real_save(tensors, filename, metadata=metadata)
        (Path(filename).parent / ".tmpQx7Zp2").write_bytes(b"half a shard")  # what safetensors 0.8 leaves
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(safetensors.torch, "save_file", killed_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "out", state)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    out = _write(tmp_path / "out", state)
    assert sorted(p.name for p in out.glob(".*")) == []
    assert verify_manifest(out, progress=False) == []


def test_a_disk_that_fills_during_a_shard_says_so_and_keeps_the_finished_shards(tmp_path, monkeypatch):
    """safetensors reports a full disk with its own SafetensorError, not an OSError: `vicuna convert` and
    `delta apply` ended in a traceback, with no word that the finished shards are kept for a rerun."""
    import safetensors.torch
    from safetensors import SafetensorError

    state, real_save = random_state(UNIFORM_SHAPES), safetensors.torch.save_file

    def disk_full_on_the_second_shard(tensors, filename, metadata=None):
        if "00002" not in filename:
            return real_save(tensors, filename, metadata=metadata)
        raise SafetensorError(
            f"Error while serializing: I/O error: No space left on device (os error 28) at path {filename!r}"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_on_the_second_shard)
    staging = tmp_path / "out.partial"
    with pytest.raises(VicunaError) as full:
        _write(tmp_path / "out", state)
    from vicuna.weights.disk import free_bytes, size

    # what is still to write against what is free: "free some space" said not how much
    left = size(sum(t.nbytes for t in state.values()) * 2 / 3)
    assert (
        f"writing {staging / 'model-00002-of-00003.safetensors'} failed (no space left on device: {left} still "
        in (str(full.value))
    )
    assert f"to write, {size(free_bytes(staging))} free on its disk);" in str(full.value)
    assert str(full.value).endswith(
        f"the shards finished so far are kept in {staging}: free some space and run the same command again to go on"
    )
    assert sorted(p.name for p in staging.glob("model-*")) == ["model-00001-of-00003.safetensors"]
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert verify_manifest(_write(tmp_path / "out", state), progress=False) == []


def test_a_drive_that_keeps_no_unix_permissions_takes_the_checkpoint(tmp_path, monkeypatch):
    """vfat and exFAT (a USB drive) refuse a chmod they cannot store with EPERM: `vicuna convert` and `delta
    apply` onto one failed with "Operation not permitted" after the first shard was written."""
    import errno
    import os

    def refused(path, mode, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "chmod", refused)
    assert verify_manifest(_write(tmp_path / "out", random_state(UNIFORM_SHAPES)), progress=False) == []


def test_a_second_job_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    state = random_state(UNIFORM_SHAPES)
    second = []

    def make(spec):  # the first job, halfway through, sees a second one start
        if spec.name == "layer.2.weight" and not second:
            with pytest.raises(VicunaError, match="another vicuna job is writing"):
                _write(tmp_path / "out", state)
            second.append("refused")
        return state[spec.name]

    _write(tmp_path / "out", state, make=make)
    assert second == ["refused"]
    assert verify_manifest(tmp_path / "out", progress=False) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock file left behind


def test_shards_get_the_permissions_of_any_new_file(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        out = _write(tmp_path / "out", random_state(UNIFORM_SHAPES))
    finally:
        os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}


def test_the_writer_runs_where_ctypes_cannot_open_the_running_program(tmp_path, monkeypatch):
    """On Windows `ctypes.CDLL(None)` raises TypeError (it tests its name for path separators), so asking
    the C library for malloc_trim there ended `vicuna convert`, `delta apply` and `get` after one shard."""
    import ctypes
    import os
    import types

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(ctypes, "_os", types.SimpleNamespace(name="nt", fspath=os.fspath))  # ctypes' own view
    monkeypatch.setitem(sys.modules, "nt", types.SimpleNamespace(_LOAD_LIBRARY_SEARCH_DEFAULT_DIRS=0x1000))
    with pytest.raises(TypeError):  # Windows' ctypes, as simulated
        ctypes.CDLL(None)
    state = random_state(UNIFORM_SHAPES)
    out = _write(tmp_path / "out", state)
    assert verify_manifest(out, progress=False) == []


def test_an_empty_output_folder_made_beforehand_is_taken_on_windows_too(tmp_path, monkeypatch):
    """An empty OUT is accepted, and POSIX renames the staging folder onto it, but Windows refuses to
    rename a folder onto an existing one: the whole job was made, then failed, and failed again on each
    re-run."""
    import os

    rename = os.replace

    def as_on_windows(src, dst):
        if Path(dst).is_dir():
            raise PermissionError(5, "Access is denied", str(src), None, str(dst))
        rename(src, dst)

    monkeypatch.setattr(os, "replace", as_on_windows)
    (tmp_path / "out").mkdir()
    state = random_state(UNIFORM_SHAPES)
    out = _write(tmp_path / "out", state)
    assert verify_manifest(out, progress=False) == [] and not (tmp_path / "out.partial").exists()
