"""The disk under a job that writes a model (a download, a conversion, a merge, a training run): the free-disk
check, so a long job is refused up front with the amount it needs instead of failing hours later on a full
disk; the one-writer lock on its output; `disk_full`, which knows a full disk in a failed write's words; and
`write_atomically`, for the small files (records, manifests) written beside it."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from vicuna.errors import VicunaError

GB = 1e9


def size(n: float) -> str:
    """Bytes for a person: '12.34 GB' from a tenth of a GB, '3.2 MB' from 1 MB, '4.1 kB' from 1 kB, '12 bytes'
    below (a small repository's files were '0.00 GB')."""
    for unit, scale, least, digits in (("GB", GB, GB / 10, 2), ("MB", 1e6, 1e6, 1), ("kB", 1e3, 1e3, 1)):
        if abs(n) >= least:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n:.0f} bytes"


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or, while it does not exist yet, its nearest parent)."""
    probe = Path(folder).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def ensure_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Raise VicunaError when `folder`'s disk has less than `needed_bytes` free; `what` names the job."""
    free = free_bytes(folder)
    if needed_bytes > free:
        raise VicunaError(
            f"{what} needs {size(needed_bytes)} of free disk in {folder}, but only {size(free)} "
            f"is available there; free {size(needed_bytes - free)} or choose another folder"
        )


def locked(handle: IO[str], wait: bool = True) -> bool:
    """Lock a file opened for writing, for this process until it closes it or dies; False where `wait` is
    False and another process holds it. Windows has no flock: there the file's first byte is locked, tried
    each second; without one, two first starts converted the built-in model into the same folder at once,
    each removing what the other wrote, and two jobs wrote the same output. A drive that keeps no locks
    there (some network shares) is used unlocked, as before: msvcrt's waiting LK_LOCK fails on it as on a
    held lock, which made a first start wait for ever, and a job always "another vicuna job is writing"."""
    try:
        import fcntl
    except ImportError:
        import msvcrt

        while True:
            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                return True
            except OSError as err:
                if err.errno != errno.EACCES:  # EACCES: another process holds it; else no lock can be had
                    return True
                if not wait:
                    return False
            time.sleep(1)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as err:
        # an NFS mount without its lock service (ENOLCK: NFSv3 where rpc.statd does not run, as in most
        # containers), a filesystem with no locks (some FUSE ones): used unlocked, as such a Windows drive is.
        # Every job writing there, a first chat's conversion of the built-in model too, was refused
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    return True


@contextmanager
def one_writer(out: Path, staging: Path, wait_as: str | None = None) -> Iterator[bool]:
    """Refuse a second job writing `out` while one is (two would overwrite each other's files in `staging`): a
    lock on a hidden file beside it, let go when the job ends or its process dies. Beside the folder its path
    resolves to: `--dir .` has no name to put beside (a ValueError traceback), and two jobs that spell the
    folder two ways (`--dir .` and its full path) are the same job. With `wait_as` ("downloading", "converting"), a job
    that only needs the folder finished waits for the other instead, saying so; it yields whether it waited
    (the other may have finished the folder)."""
    where = staging.resolve()
    lock = where.with_name(f".{where.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock.touch()
    except PermissionError:
        # a folder written in place, in one that may not be written (a container's volume, --dir /models):
        # the lock goes inside it, hidden (never listed in a manifest)
        if staging != out or not where.is_dir():
            raise
        lock = where / ".vicuna.lock"
    waited = False
    while True:
        # "a": no truncation of a file whose byte another process locked; closed as the job ends, below
        handle = open(lock, "a")  # noqa: SIM115
        if not locked(handle, wait=False):
            if wait_as is None:
                handle.close()
                raise VicunaError(
                    f"another vicuna job is writing {out} now"
                    + (f" ({staging})" if staging != out else "")
                    + "; wait for it to finish or stop it"
                )
            if not waited:
                print(
                    f"Waiting for another vicuna process {wait_as} into {out} (it holds {lock}) ...",
                    file=sys.stderr,
                    flush=True,
                )
            waited = True
            locked(handle)
        if _names(lock, handle):
            break
        # the job waited for deleted this file as it ended: a job started since locks a new one, which
        # this one must hold too, or both would write
        handle.close()
    try:
        yield waited
    finally:
        with suppress(PermissionError):  # Windows removes no file held open: it stays, empty
            lock.unlink(missing_ok=True)
        handle.close()


def _names(path: Path, handle: IO[str]) -> bool:
    """Whether `path` still names the file `handle` has open. Always on Windows, which deletes no file held
    open (the job waited for fails to delete it while this one has it), and where stat and fstat give a file
    other identities on some drives (WebDAV): asked there, a job was told no for ever and locked again and
    again, at full CPU."""
    if sys.platform == "win32":
        return True
    try:
        return os.path.samestat(os.stat(path), os.fstat(handle.fileno()))
    except FileNotFoundError:
        return False


def new_file_mode() -> int:
    """The permissions open() gives a new file here: 0o666 less the umask (which can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def set_mode(path: Path, mode: int) -> None:
    """chmod, where the filesystem keeps Unix permissions: vfat and exFAT (a USB drive, a camera card) and
    some network shares refuse a mode they cannot store with EPERM, which failed a conversion, a merge or a
    training run onto such a drive after all its weights were written, and every `!!save` there."""
    try:
        os.chmod(path, mode)
    except PermissionError as err:
        if err.errno != errno.EPERM:
            raise


def as_new_files(folder: Path) -> None:
    """Give the files in `folder` the permissions open() gives a new file: safetensors (under transformers'
    save_pretrained) creates its files readable by their owner only, so the built-in model converted into a
    shared $VICUNA_HOME, or a merged model, could not be loaded by the others who can read its folder."""
    mode = new_file_mode()
    for path in folder.iterdir():
        if path.is_file():
            set_mode(path, mode)


def is_standard_output(path: Path) -> bool:
    """Whether `path` is the file, pipe or terminal that standard output writes to (`--json /dev/stdout`)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(1))
    except OSError:
        return False


def write_atomically(path: Path, data: str | bytes, mode: int | None = None) -> None:
    """Write `data` (text as UTF-8) to a hidden temporary name beside `path`, renamed over it: a reader (or a
    job resumed after a kill) never sees half a file, nor a temporary one in a listing; a failed write leaves
    none behind. A file written over keeps its permissions, as an editor keeps them (the renamed one had the
    umask's: a conversation its owner had made private became readable by all); a new one gets `mode`, or
    the umask's (0o644 most often). A link is written through, as the shell's `>` does: the file it points
    to is replaced, in its own folder, and the link stays (it was replaced by a file of its own: `!!save`
    over a link left the linked file as it was). A file that is not a regular one (/dev/null, a pipe, a link
    to one) is written into as it is: renamed over, run as root, the device itself became a regular file."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    with suppress(FileNotFoundError):
        st = os.stat(path)  # through links
        if not stat.S_ISREG(st.st_mode):  # by the name given: /dev/fd/N's target is no path ('pipe:[N]')
            with open(path, "wb") as f:
                f.write(data)
            return
        mode = stat.S_IMODE(st.st_mode)
    path = Path(os.path.realpath(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # created readable by its owner only where it is to stay so, not opened to all until the chmod
        with open(
            os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else 0o600), "wb"
        ) as f:
            f.write(data)
        if mode is not None:
            set_mode(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:  # Ctrl-C too
        with suppress(OSError):  # where nothing could be written, nothing is to be removed
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not err.filename:  # a write's error names none: "No space left"
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def disk_full(err: BaseException | str) -> str | None:
    """What ran out where a write failed for want of disk space or of quota, in the words of torch.save
    ("unexpected pos"), safetensors (Rust's "StorageFull", "os error 28") or the OS (ENOSPC, EDQUOT); None
    where something else failed. A quota used up (a shared server's, an NFS home's) was not known as one:
    safetensors' error came out as a traceback. `err` may be what a program said (a compiler's errors)."""
    said = str(err)
    if getattr(err, "errno", None) == getattr(errno, "EDQUOT", -1) or "Disk quota exceeded" in said:
        return "disk quota exceeded"
    if getattr(err, "errno", None) == errno.ENOSPC or any(
        words in said for words in ("unexpected pos", "StorageFull", "No space left on device")
    ):
        return "no space left on device"
    return None


def os_error_said(err: OSError) -> str:
    """A failed file operation in one line: the cause and the path, and for a denied permission whose the file
    or folder is and its mode (a shared folder another user owns), for a full disk what is free on it. The
    CLI said only "Permission denied: PATH" and "No space left on device: PATH"."""
    said = f"{err.strerror or err}" + (f": {os.fsdecode(err.filename)}" if err.filename else "")
    if not err.filename:
        return said
    path = Path(os.fsdecode(err.filename)).absolute()
    try:
        if err.errno in (errno.EACCES, errno.EPERM):
            probe = next(p for p in (path, *path.parents) if p.exists())
            st = probe.stat()
            return f"{said} ({probe} is {_user(st.st_uid)}'s, mode {stat.S_IMODE(st.st_mode):04o}; vicuna runs as {_user(os.geteuid())})"
        if disk_full(err):
            return f"{said} ({size(free_bytes(path))} free on its disk)"
    except (ImportError, OSError):  # ImportError: Windows has no pwd, nor a file an owning user id
        pass
    return said


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a user id with no name here (a container's, an NFS server's)
        return f"user {uid}"
