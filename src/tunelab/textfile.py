"""Text files from users: read as UTF-8, or refused with what they are instead.

A file in another encoding (Latin-1, UTF-16), a binary file given as text, or JSON nested
deeper than Python can parse is a :class:`~tunelab.errors.DataError` that names the file
(and the line) and says how to fix it, never a bare ``UnicodeDecodeError`` or
``RecursionError``. Data files, config files, format files and templates are all read here.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

SAVE_AS_UTF8 = "open it in an editor or spreadsheet and save it as UTF-8 (Save As, encoding UTF-8)"
# Binary files that users give as data by mistake, by their first bytes.
KNOWN_BINARY = {
    b"PAR1": ("a Parquet file", "name it .parquet"),
    b"PK\x03\x04": (
        "a ZIP archive (an Excel .xlsx workbook is one)",
        "save or export it as CSV UTF-8",
    ),
    b"\x1f\x8b": ("gzip-compressed", "decompress it first (gunzip)"),
}


def whole_file_problem(raw: bytes) -> tuple[str, str] | None:
    """What a file that is not UTF-8 text as a whole is, and the fix, told by its first bytes."""
    if raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16: FF FE 00 00
        return "the file is UTF-32 text, not UTF-8", SAVE_AS_UTF8
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "the file is UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8", (
            SAVE_AS_UTF8
        )
    for magic, (what, fix) in KNOWN_BINARY.items():
        if raw.startswith(magic):
            return f"{what}, not text", fix
    head = raw[:8192]
    if b"\0" not in head:
        return None
    # ASCII in UTF-16 has a zero byte in every other place; binary data has them anywhere
    odd, even = head[1::2].count(0), head[0::2].count(0)
    if max(odd, even) > len(head) // 4 and min(odd, even) <= len(head) // 100:
        return "the file looks like UTF-16 text, not UTF-8", SAVE_AS_UTF8
    return (
        "a binary file, not text",
        "give a data file: UTF-8 text (.json, .jsonl, .csv, .txt) or Parquet",
    )


def _not_text(path: Path, raw: bytes, at: int) -> DataError:
    """Why bytes that are not UTF-8 text (bad at offset ``at``) cannot be read, and the fix."""
    whole = whole_file_problem(raw)
    if whole:
        return DataError(f"{path}: {whole[0]}", whole[1])
    line = raw.count(b"\n", 0, at) + 1
    if raw[at] == 0:
        return DataError(f"{path}:{line}: line {line} holds a NUL byte: not a text file")
    start = raw.rfind(b"\n", max(0, at - 30), at) + 1 or max(0, at - 30)
    near = raw[start : at + 10].split(b"\n")[0].decode("utf-8", "backslashreplace")
    return DataError(
        f"{path}:{line}: line {line} is not UTF-8 text (byte 0x{raw[at]:02x} in '{near}'); "
        "it may be Latin-1 or Windows-1252",
        SAVE_AS_UTF8,
    )


def read_text(path: Path) -> str:
    """The text of a file: UTF-8, with or without a BOM. Another encoding, a binary file or
    an unreadable one is a :class:`DataError` naming the file and the fix."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_text(path, raw, exc.start) from None
    if "\0" in text:  # valid UTF-8, but no text file holds NUL characters
        raise _not_text(path, raw, raw.index(b"\0"))
    return text


def loads_json(text: str, place: str) -> Any:
    """``json.loads``; JSON that Python cannot hold (nesting too deep, numbers too long) is a
    DataError naming ``place``; bad syntax stays a ``JSONDecodeError`` for the caller."""
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(
            f"{place}: the JSON is nested too deeply to read (too many levels of [ ] or {{ }})",
            "a data row is an object of text fields (and lists of turns); "
            "check the program that wrote the file",
        ) from None
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # Python refuses integers of more than 4300 digits
        raise DataError(
            f"{place}: a number in the JSON is too long to read ({str(exc).split(';')[0]})",
            "write it as a string",
        ) from None
