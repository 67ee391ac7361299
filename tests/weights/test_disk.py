"""The free-disk check (the amounts needed and available, the nearest existing folder probed) and the
one-writer lock on an output (a second job refused or waiting, on POSIX and on Windows)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from vicuna.errors import VicunaError
from vicuna.weights.disk import ensure_free_space, free_bytes, size, write_atomically


@pytest.fixture
def free_disk(monkeypatch):
    """Pretend the disk has `free` bytes; records the paths that were asked about."""
    asked, real = [], shutil.disk_usage

    def fake(path):
        asked.append(path)
        return real(path)._replace(free=30_500_000_000)

    monkeypatch.setattr(shutil, "disk_usage", fake)
    return asked


def test_enough_space_passes(free_disk, tmp_path):
    ensure_free_space(tmp_path, 30_000_000_000, "merging")


def test_too_little_space_names_both_amounts(free_disk, tmp_path):
    with pytest.raises(VicunaError) as err:
        ensure_free_space(tmp_path / "out", 40_000_000_000, "merging vicuna-13b")
    message = str(err.value)
    assert message.startswith("merging vicuna-13b needs 40.00 GB of free disk in ")
    assert "only 30.50 GB is available" in message and "free 9.50 GB" in message


def test_missing_folder_is_checked_on_its_nearest_parent(free_disk, tmp_path):
    assert free_bytes(tmp_path / "a" / "b" / "c") == 30_500_000_000
    assert free_disk == [tmp_path]
    assert not (tmp_path / "a").exists()  # the check creates nothing


def test_real_disk(tmp_path):
    assert free_bytes(tmp_path) == shutil.disk_usage(tmp_path).free
    with pytest.raises(VicunaError, match="needs"):
        ensure_free_space(tmp_path, free_bytes(tmp_path) + 10**15, "a petabyte")


class WindowsLocks:
    """msvcrt's byte-range locks as Windows keeps them, per file, across processes; without fcntl."""

    LK_LOCK, LK_NBLCK = 1, 2

    def __init__(self, monkeypatch, busy_tries=0, kept=True):
        import os
        import sys
        import time
        import types

        self.held, self.calls, self.busy_tries, self.kept = set(), [], busy_tries, kept
        msvcrt = types.ModuleType("msvcrt")
        msvcrt.LK_LOCK, msvcrt.LK_NBLCK, msvcrt.locking = self.LK_LOCK, self.LK_NBLCK, self.locking
        monkeypatch.setitem(sys.modules, "fcntl", None)  # Windows has none
        monkeypatch.setitem(sys.modules, "msvcrt", msvcrt)
        monkeypatch.setattr(time, "sleep", lambda s: None)
        self.file_id = lambda fd: os.fstat(fd).st_ino

    def locking(self, fd, mode, nbytes):
        self.calls.append(mode)
        if len(self.calls) > 20:
            raise AssertionError("tried for ever")
        if not self.kept:  # LockFile fails: LK_LOCK says EDEADLOCK after 10 s, LK_NBLCK the error at once
            raise OSError(errno.EDEADLOCK if mode == self.LK_LOCK else errno.EINVAL, "cannot lock")
        if self.file_id(fd) in self.held or self.busy_tries:
            self.busy_tries = max(0, self.busy_tries - 1)
            # held by another process: LK_LOCK says so after 10 s, LK_NBLCK at once
            raise OSError(errno.EDEADLOCK if mode == self.LK_LOCK else errno.EACCES, "locked")
        self.held.add(self.file_id(fd))


def test_on_windows_a_second_job_writing_the_same_output_is_refused(monkeypatch, tmp_path):
    """Windows has no fcntl: there two jobs wrote into the same staging folder, each over the other's files."""
    from vicuna.weights.disk import one_writer

    WindowsLocks(monkeypatch)
    out = tmp_path / "我的 模型"
    refused = pytest.raises(VicunaError, match=re.escape(f"another vicuna job is writing {out} now"))
    with one_writer(out, out), refused:  # a first job, still writing, holds it
        one_writer(out, out).__enter__()


def test_on_windows_a_second_start_waits_for_the_built_in_model_s_conversion(monkeypatch, tmp_path):
    """Two first starts at once converted the built-in model into the same folder, each removing what the
    other wrote; the second now waits, as msvcrt does: 10 s at a time."""
    from vicuna.weights.disk import one_writer

    locks = WindowsLocks(monkeypatch, busy_tries=2)  # another start converts for a while
    with one_writer(tmp_path / "SmolLM2", tmp_path / "SmolLM2", wait_as="converting"):
        assert len(locks.calls) == 3


def test_on_a_windows_drive_that_keeps_no_locks_vicuna_goes_on_unlocked_as_before(monkeypatch, tmp_path):
    """Some network shares keep no byte-range locks: msvcrt's waiting LK_LOCK fails there as on a lock another
    process holds, so a first start waited for ever to convert the built-in model, and every job was refused
    as "another vicuna job is writing"."""
    from vicuna.weights.disk import one_writer

    WindowsLocks(monkeypatch, kept=False)
    built_in = tmp_path / "SmolLM2"
    with one_writer(built_in, built_in, wait_as="converting"), one_writer(tmp_path / "out", tmp_path / "out"):
        pass


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_on_a_network_mount_that_keeps_no_locks_vicuna_goes_on_unlocked(monkeypatch, tmp_path, code):
    """A $VICUNA_HOME or output on NFS without its lock service (NFSv3 where rpc.statd does not run) or on a
    filesystem without locks: flock failed with "No locks available", and every job writing there was
    refused with it, a first chat's conversion of the built-in model too."""
    fcntl = pytest.importorskip("fcntl")
    from vicuna.weights.disk import one_writer

    def no_locks(handle, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    built_in = tmp_path / "SmolLM2"
    with one_writer(built_in, built_in, wait_as="converting"), one_writer(tmp_path / "out", tmp_path / "out"):
        pass
    assert list(tmp_path.iterdir()) == []  # no lock left


def test_a_job_into_the_folder_it_runs_in_is_kept_from_a_second_under_its_full_path(monkeypatch, tmp_path):
    """`vicuna download ... --dir .` (and download-llama's, train's --output-dir .) ended in a ValueError
    traceback: a folder named '.' has no name to put a lock beside; and the same folder spelled two ways is
    the same output, for the same lock."""
    from pathlib import Path

    from vicuna.weights.disk import one_writer

    out = tmp_path / "model"
    out.mkdir()
    monkeypatch.chdir(out)
    refused = pytest.raises(VicunaError, match=re.escape(f"another vicuna job is writing {out} now"))
    with one_writer(Path("."), Path(".")), refused:
        one_writer(out, out).__enter__()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no lock left


def test_a_folder_written_in_place_in_one_that_may_not_be_written_is_locked_inside(monkeypatch, tmp_path):
    """`vicuna download ... --dir /models` or `vicuna train --output-dir /output`, a container's volume in a
    folder its user may not write: the lock beside it could not be made, and the job was refused with
    'Permission denied: /.models.lock'. The lock goes inside the folder there."""
    from vicuna.weights import disk

    out = tmp_path / "volume"
    out.mkdir()

    touch = Path.touch

    def touch_(path):
        if path.parent == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        touch(path)

    monkeypatch.setattr(Path, "touch", touch_)
    refused = pytest.raises(VicunaError, match=re.escape(f"another vicuna job is writing {out} now"))
    with disk.one_writer(out, out), refused:
        assert [p.name for p in out.iterdir()] == [".vicuna.lock"]
        disk.one_writer(out, out).__enter__()
    assert list(out.iterdir()) == [] and list(tmp_path.iterdir()) == [out]
    beside = disk.one_writer(tmp_path / "model", out)  # a folder made beside its output: no way round
    with pytest.raises(PermissionError):
        beside.__enter__()


def test_a_job_that_waited_keeps_out_one_started_after_the_first_ended(monkeypatch, tmp_path):
    """A job that waits (a first start downloading what another start is downloading) waited on the lock's
    file, which the first job deleted as it ended: it then held a lock on a file no longer there, and a job
    started after that locked a new file, so both wrote the folder."""
    from vicuna.weights import disk

    out = tmp_path / "model"
    first, real_locked = disk.one_writer(out, out), disk.locked
    first.__enter__()

    def locked(handle, wait=True):
        if wait:  # the first job ends while the second waits for it
            monkeypatch.setattr(disk, "locked", real_locked)
            first.__exit__(None, None, None)
        return real_locked(handle, wait)

    monkeypatch.setattr(disk, "locked", locked)
    refused = pytest.raises(VicunaError, match=re.escape(f"another vicuna job is writing {out} now"))
    with disk.one_writer(out, out, wait_as="downloading") as waited, refused:
        assert waited
        disk.one_writer(out, out).__enter__()  # a third job, started now
    assert list(tmp_path.iterdir()) == []  # no lock left


def test_a_job_on_a_drive_whose_stat_and_fstat_disagree_is_not_held_for_ever(monkeypatch, tmp_path):
    """Windows deletes no file held open, so the lock's file a job locked is the one its path names; but on
    some of its drives (WebDAV, where `sameopenfile` fails) stat and fstat give a file other identities, and a
    job that asked whether its lock's file was still there was told no for ever: it opened and locked the
    file again and again, at full CPU, and never wrote."""
    import os
    import sys

    from vicuna.weights import disk

    real, asked = os.fstat, []

    def fstat(fd):  # another identity than os.stat's for the same file
        asked.append(fd)
        if len(asked) > 100:
            raise AssertionError("the job locked the file again and again")
        st = real(fd)
        return os.stat_result((st.st_mode, st.st_ino + 1, *st[2:10]))

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(os, "fstat", fstat)
    with disk.one_writer(tmp_path / "model", tmp_path / "model") as waited:
        assert not waited


def test_a_file_written_through_a_link_keeps_the_link_and_is_written_beside_its_target(tmp_path):
    """The link was replaced by a file of its own, and the file it named kept the old text (`!!save` over
    a link, a record kept in a dotfiles folder)."""
    (tmp_path / "dotfiles").mkdir()
    target = tmp_path / "dotfiles" / "saved.json"
    target.write_text("old", encoding="utf-8")
    target.chmod(0o600)
    (tmp_path / "relative").symlink_to(Path("dotfiles") / "saved.json")
    (tmp_path / "link").symlink_to(tmp_path / "relative")  # a link to a link
    write_atomically(tmp_path / "link", "new")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "relative").is_symlink()
    assert target.read_text(encoding="utf-8") == "new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dotfiles", "link", "relative", "saved.json"]
    (tmp_path / "dangling").symlink_to(tmp_path / "dotfiles" / "new.json")
    write_atomically(tmp_path / "dangling", b"made")  # as the shell's `>` makes the file a link names
    assert (tmp_path / "dangling").is_symlink() and (tmp_path / "dangling").read_bytes() == b"made"


def test_a_file_that_is_not_a_regular_one_is_written_into_not_renamed_over(tmp_path):
    """Renamed over, /dev/null (or a link to it) written by a chat run as root became a regular file for
    the whole machine; a pipe stands in for it here."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that opening it to write does not wait
    try:
        (tmp_path / "link").symlink_to(fifo)
        write_atomically(tmp_path / "link", "through the link")
        write_atomically(fifo, "|itself")
        assert os.read(reader, 100) == b"through the link|itself"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "pipe"]


@pytest.mark.parametrize(
    ("n", "said"),
    [
        (40e9, "40.00 GB"),
        (5e7, "50.0 MB"),
        (3.2e6, "3.2 MB"),
        (120_000, "120.0 kB"),
        (4_100, "4.1 kB"),
        (12, "12 bytes"),
    ],
)
def test_a_size_is_said_in_a_unit_that_shows_it(n, said):
    """A small repository's download was said to be '0.00 GB', its stale files '0.00 GB' freed."""
    assert size(n) == said


def test_a_small_file_written_onto_a_full_disk_is_named_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A write's own error names no file: `vicuna bench --json OUT` on a disk that filled during the run ended
    with "error: No space left on device" and nothing else."""
    import io
    import os

    from vicuna.weights import disk

    class Full(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")  # as write(2) says it

    monkeypatch.setattr(disk, "open", lambda fd, mode: (os.close(fd), Full())[1], raising=False)
    out = tmp_path / "report.json"
    with pytest.raises(OSError) as failed:
        disk.write_atomically(out, "{}")
    assert (failed.value.errno, failed.value.filename) == (errno.ENOSPC, str(out))
    assert disk.os_error_said(failed.value).startswith(f"No space left on device: {out} (")
    assert list(tmp_path.iterdir()) == []


def test_a_private_file_is_written_onto_a_drive_that_keeps_no_unix_permissions(tmp_path, monkeypatch):
    """`!!save` (a file only its owner may read) onto a USB drive's vfat or exFAT, which refuse a chmod they
    cannot store with EPERM: "cannot save to ...: Operation not permitted"."""
    import os

    from vicuna.weights.disk import write_atomically

    def refused(path, mode, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "chmod", refused)
    (tmp_path / "kept.json").write_text("old")
    for name in ("new.json", "kept.json"):
        write_atomically(tmp_path / name, "[]", mode=0o600)
        assert (tmp_path / name).read_text() == "[]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json", "new.json"]
