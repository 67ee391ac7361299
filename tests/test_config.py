"""Settings: where the cache lives."""

from __future__ import annotations

from pathlib import Path

import pytest

from vicuna.config import vicuna_home
from vicuna.errors import VicunaError


def test_no_home_folder_says_to_set_vicuna_home(monkeypatch):
    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("VICUNA_HOME")
    monkeypatch.setattr(Path, "home", no_home)
    with pytest.raises(VicunaError, match=r"HOME is not set\); set VICUNA_HOME to a writable folder"):
        vicuna_home()
