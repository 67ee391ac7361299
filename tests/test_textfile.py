"""The JSON files users write by hand: the encodings editors save them in, and errors a user can act on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from vicuna.errors import VicunaError
from vicuna.textfile import json_problem, read_text

TEXT = '[{"role": "user", "content": "你好，世界！"}]\n'


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-be"])
def test_utf_8_with_or_without_a_bom_and_utf_16_with_one_are_read(tmp_path, encoding):
    path = tmp_path / "对话 记录.json"
    data = TEXT.encode(encoding)
    path.write_bytes(("\ufeff" + TEXT).encode(encoding) if encoding == "utf-16-be" else data)
    assert read_text(path) == TEXT


def test_a_gbk_file_is_refused_with_its_line_and_how_to_convert_it(tmp_path):
    path = tmp_path / "数据 gbk.json"
    path.write_bytes(("[\n" + TEXT).encode("gbk"))
    with pytest.raises(VicunaError) as err:
        read_text(path)
    column = len('[{"role": "user", "content": "') + 1  # 你, the first byte that is not UTF-8
    assert str(err.value) == (
        f"{path}: not UTF-8 text (line 2, byte {column} of the line is 0xc4); it reads as GBK: convert it with "
        f"`iconv -f GB18030 -t UTF-8 '{path}' > NEW_FILE`"
    )


def test_on_windows_a_gbk_file_is_refused_with_a_way_to_convert_it_there(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")  # no iconv there
    path = tmp_path / "数据.json"
    path.write_bytes(TEXT.encode("gbk"))
    with pytest.raises(VicunaError) as err:
        read_text(path)
    assert str(err.value).endswith(
        "it reads as GBK: open it in Notepad and save it with File > Save As, Encoding: UTF-8"
    )


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(VicunaError, match=r"nope\.json: no such file"):
        read_text(tmp_path / "nope.json")


def test_a_folder_is_named_as_one(tmp_path):
    """`vicuna train --data .` said only 'error: Is a directory: .'."""
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(VicunaError, match=r"data: a folder, not a file; name the file in it"):
        read_text(folder)


def test_a_folder_is_named_as_one_on_windows_too(tmp_path, monkeypatch):
    """Windows refuses to open a folder with 'Permission denied', not 'Is a directory'."""
    folder = tmp_path / "data"
    folder.mkdir()
    read_bytes = Path.read_bytes

    def as_windows(self):
        if self.is_dir():
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", as_windows)
    with pytest.raises(VicunaError, match=r"data: a folder, not a file; name the file in it"):
        read_text(folder)


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ('{"id"："一"}', "'：' where JSON needs ':'"),
        ("[{“id”: 1}]", "'“' where JSON needs '\"'"),
        ("[1，2]", "'，' where JSON needs ','"),
        ("【1, 2】", "'【' where JSON needs '['"),  # the bracket a Chinese input method types for [
    ],
)
def test_full_width_punctuation_from_an_input_method_is_named(text, found):
    with pytest.raises(json.JSONDecodeError) as err:
        json.loads(text)
    assert json_problem(err.value).endswith(f"found the full-width {found}")


def test_other_json_errors_are_told_as_they_are():
    with pytest.raises(json.JSONDecodeError) as err:
        json.loads('[{"a": 1},]')
    assert json_problem(err.value) == str(err.value)
