"""Free-disk check run before a download or a merge, so a long job is refused up front with the amount
it needs instead of failing hours later on a full disk."""

from __future__ import annotations

import shutil
from pathlib import Path

from vicuna.errors import VicunaError

GB = 1e9


def size(n: float) -> str:
    """Bytes for a person: '12.34 GB', or '3.2 MB' below a tenth of a GB."""
    return f"{n / GB:.2f} GB" if abs(n) >= GB / 10 else f"{n / 1e6:.1f} MB"


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
