"""The free-disk check: refuses with the amount needed and available, in GB; probes the nearest existing folder."""

from __future__ import annotations

import shutil

import pytest

from vicuna.errors import VicunaError
from vicuna.weights.disk import ensure_free_space, free_bytes


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
