"""sha256 manifests: written over a folder, rechecked by `vicuna verify`, naming missing and changed files."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from vicuna.cli import main
from vicuna.errors import VicunaError
from vicuna.weights.manifest import MANIFEST_NAME, read_manifest, verify_manifest, write_manifest


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "model.safetensors").write_bytes(bytes(range(256)) * 100)
    (root / "sub" / "notes.txt").write_text("hello")
    (root / ".cache").mkdir()
    (root / ".cache" / "state").write_text("changes on its own")
    (root / ".hidden").write_text("x")
    return root


def test_manifest_lists_every_file_with_its_sha256(folder):
    manifest = write_manifest(folder, progress=False)
    assert manifest == folder / MANIFEST_NAME
    entries = read_manifest(folder)
    assert sorted(entries) == ["config.json", "model.safetensors", "sub/notes.txt"]
    assert entries["config.json"] == hashlib.sha256(b'{"a": 1}').hexdigest()
    assert verify_manifest(folder, progress=False) == []
    if shutil.which("sha256sum"):  # the coreutils format, so `sha256sum -c SHA256SUMS` works too
        subprocess.run(["sha256sum", "--quiet", "-c", MANIFEST_NAME], cwd=folder, check=True)


def test_verify_names_changed_and_missing_files(folder):
    write_manifest(folder, progress=False)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[1000] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    (folder / "sub" / "notes.txt").unlink()
    (folder / ".cache" / "state").write_text("changed")  # hidden bookkeeping is not checked
    problems = verify_manifest(folder, progress=False)
    assert len(problems) == 2
    assert problems[0] == f"missing: {folder / 'sub' / 'notes.txt'}"
    assert problems[1].startswith(f"changed: {folder / 'model.safetensors'} (sha256 ")


def test_verify_names_added_files_a_loader_would_read(folder):
    write_manifest(folder, progress=False)
    (folder / "README.md").write_text("notes may be added")
    (folder / ".cache" / "more").write_text("so may hidden bookkeeping")
    assert verify_manifest(folder, progress=False) == []
    (folder / "pytorch_model.bin").write_bytes(b"weights transformers would load instead")
    (folder / "sub" / "tokenizer_config.json").write_text("{}")
    assert verify_manifest(folder, progress=False) == [
        f"not in the manifest: {folder / 'pytorch_model.bin'} (a loader would read it)",
        f"not in the manifest: {folder / 'sub' / 'tokenizer_config.json'} (a loader would read it)",
    ]
    # a training run's checkpoint beside the model it wrote is a state to resume from, not the model's
    (folder / "checkpoint-30").mkdir()
    (folder / "checkpoint-30" / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-30" / "model.safetensors").write_bytes(b"weights")
    assert len(verify_manifest(folder, progress=False)) == 2


def test_verify_command(folder, capsys):
    write_manifest(folder, progress=False)
    assert main(["verify", str(folder), "--no-progress"]) == 0
    assert "ok: 3 files match" in capsys.readouterr().out
    (folder / "config.json").write_text("{}")
    assert main(["verify", str(folder), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"changed: {folder / 'config.json'}" in err
    assert "1 file(s) do not match" in err


def test_verify_errors(tmp_path, folder, capsys):
    with pytest.raises(VicunaError, match=r"nowhere: no such folder$"):
        verify_manifest(tmp_path / "nowhere")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(VicunaError, match="a-file is not a folder"):
        verify_manifest(tmp_path / "a-file")
    with pytest.raises(VicunaError, match=f"{MANIFEST_NAME} does not exist"):
        verify_manifest(folder)
    assert main(["verify", str(folder)]) == 2
    assert "error: " in capsys.readouterr().err
    (folder / MANIFEST_NAME).write_text("abc  config.json\n")
    with pytest.raises(VicunaError, match="line 1 is not"):
        verify_manifest(folder)
    # each ended in a traceback (UnicodeDecodeError), or checked a file outside the folder
    (folder / MANIFEST_NAME).write_bytes(b"\xff\xfe")
    with pytest.raises(VicunaError, match=f"{MANIFEST_NAME}: not UTF-8 text"):
        verify_manifest(folder)
    (folder / MANIFEST_NAME).write_text(f"{'0' * 64}  ../outside.json\n")
    with pytest.raises(VicunaError, match="line 1 names a file outside .*: '../outside.json'"):
        verify_manifest(folder)


def test_bars_are_drawn_only_on_a_terminal_that_redraws_and_nowhere_without_one(monkeypatch, tmp_path):
    """Under pythonw (Windows, no console) sys.stderr is None, and a notebook's or an IDE's stand-in may have
    no isatty or be closed: `load_engine` asked it, and failed with an AttributeError."""
    import io

    from vicuna.weights import manifest

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("TERM", "xterm-256color")
    assert manifest.redraws(Terminal())
    closed = open(tmp_path / "log", "w")  # noqa: SIM115
    closed.close()
    assert not any(manifest.redraws(stream) for stream in (None, object(), closed, io.StringIO()))
    monkeypatch.setenv("TERM", "dumb")
    assert not manifest.redraws(Terminal())
