"""Reading the JSON files users write by hand (conversations, training data), whatever their editor did.

UTF-8 with or without a byte-order mark (Windows Notepad adds one) and UTF-16 with one (Notepad's
"Unicode") are read; a file in another encoding (GBK, on a Chinese Windows) is refused with the line
where it stops being UTF-8 and how to convert it. A JSON syntax error that is a full-width twin of
JSON's punctuation, typed with a Chinese or Japanese input method (：，“”), says so.
"""

from __future__ import annotations

import codecs
import json
import sys
from pathlib import Path
from typing import Any

from vicuna.errors import VicunaError
from vicuna.shell import quote

# full-width characters an input method types where JSON needs ASCII punctuation
FULL_WIDTH = {
    "：": ":",
    "，": ",",
    "“": '"',
    "”": '"',
    "＂": '"',
    "｛": "{",
    "｝": "}",
    "［": "[",
    "］": "]",
    "【": "[",
    "】": "]",
}


def read_text(path: Path) -> str:
    """The file's text; VicunaError when it does not exist or is not UTF-8 (or UTF-16 with a BOM)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise VicunaError(f"{path}: no such file") from None
    except (IsADirectoryError, PermissionError):  # Windows refuses to open a folder with PermissionError
        if path.is_dir():
            raise VicunaError(f"{path}: a folder, not a file; name the file in it") from None
        raise VicunaError(f"{path}: no permission to read it") from None
    utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    try:
        return data.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)  # in bytes, from 1
        message = (
            f"{path}: not UTF-8 text (line {line}, byte {column} of the line is 0x{data[err.start]:02x})"
        )
        try:
            data.decode("gb18030")
            if sys.platform == "win32":  # no iconv there; Notepad opens GBK on a Chinese Windows as it is
                message += (
                    "; it reads as GBK: open it in Notepad and save it with File > Save As, Encoding: UTF-8"
                )
            else:
                message += f"; it reads as GBK: convert it with `iconv -f GB18030 -t UTF-8 {quote(str(path))} > NEW_FILE`"
        except UnicodeDecodeError:
            message += "; save it as UTF-8"
        raise VicunaError(message) from None


def read_json(path: Path) -> Any:
    """The JSON the file holds (`read_text`), or a VicunaError naming the file and what is wrong where."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise VicunaError(f"{path}: not valid JSON ({json_problem(err)})") from None


def json_problem(err: json.JSONDecodeError) -> str:
    """What is wrong, where: the error, and the full-width character found there if that is the cause."""
    found = err.doc[err.pos : err.pos + 1]
    if found in FULL_WIDTH:
        return f"{err}: found the full-width {found!r} where JSON needs {FULL_WIDTH[found]!r}"
    return str(err)
