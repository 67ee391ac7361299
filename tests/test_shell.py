"""Quoting the paths of the commands printed for the user to paste."""

from __future__ import annotations

import sys

from vicuna.shell import quote


def test_paths_are_quoted_for_a_posix_shell():
    assert quote("models/vicuna-7b") == "models/vicuna-7b"
    assert quote("/home/李雷/my models") == "'/home/李雷/my models'"


def test_paths_are_quoted_for_cmd_and_powershell_on_windows(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    assert quote(r"models\vicuna-7b") == r"models\vicuna-7b"  # cmd would keep single quotes in the name
    assert quote(r"C:\Users\李雷\vicuna-7b") == r"C:\Users\李雷\vicuna-7b"
    assert quote(r"C:\Users\Li Lei\my models") == r'"C:\Users\Li Lei\my models"'
    assert quote(r"D:\models (old),v1") == r'"D:\models (old),v1"'  # PowerShell reads ( and , itself
    assert quote("") == '""'
