"""Rows and examples read when needed, so that a dataset larger than memory can be prepared.

A JSON-lines file is checked line by line once (every problem is reported before anything
is tokenized) and afterwards read again by byte offset: memory holds twelve bytes per row
(its offset and line number), not the row. Its examples are converted from their rows
when read (:class:`Converted`), and merging, de-duplicating, shuffling and splitting are
views that keep row numbers only (:class:`Chain`, :class:`Picked`). Forked workers read
the same file through their own handle.
"""

from __future__ import annotations

import bisect
import codecs
import json
import os
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import DataError
from tunelab.textfile import loads_json, read_text, whole_file_problem


@dataclass(frozen=True)
class Row:
    """One record and its place: ``where`` reads 'line 12' (JSONL, CSV) or 'row 3'."""

    data: dict[str, Any]
    where: str


class _View(Sequence):
    """A read-only sequence whose slices are views of the same kind."""

    def _item(self, index: int) -> Any:
        raise NotImplementedError

    def _slice(self, positions: range) -> Sequence:
        raise NotImplementedError

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self._slice(range(*index.indices(len(self))))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._item(index)


class JsonLines(_View):
    """The rows of a JSON-lines file (``Row`` objects, 'line N'), read from disk by offset."""

    def __init__(self, path: Path, offsets: array | None = None, numbers: array | None = None):
        self.path = path
        if offsets is None or numbers is None:
            offsets, numbers = _scan(path)
        self.offsets, self.numbers = offsets, numbers
        self.ascending = True  # offsets in file order
        self._handle: tuple[int, Any] | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def _file(self) -> Any:
        if self._handle is None or self._handle[0] != os.getpid():  # a forked worker opens its own
            self._handle = (os.getpid(), self.path.open("rb"))
        return self._handle[1]

    def _item(self, index: int) -> Any:
        f = self._file()
        f.seek(self.offsets[index])
        return _row(self.path, f.readline(), self.numbers[index])

    def _slice(self, positions: range) -> JsonLines:
        offsets = array("q", (self.offsets[i] for i in positions))
        numbers = array("q", (self.numbers[i] for i in positions))
        view = JsonLines(self.path, offsets, numbers)
        view.ascending = self.ascending and positions.step > 0
        return view

    def __iter__(self) -> Iterator[Any]:
        if not self.ascending:
            yield from (self._item(i) for i in range(len(self)))
            return
        with self.path.open("rb") as f:  # in file order: one pass, seeking only over gaps
            for offset, number in zip(self.offsets, self.numbers, strict=True):
                if f.tell() != offset:
                    f.seek(offset)
                yield _row(self.path, f.readline(), number)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}


def _parse(path: Path, raw: bytes, number: int) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        read_text(path)  # says what the file is instead, and where
        raise DataError(f"{path}:{number}: line {number} is not UTF-8 text") from None
    return json_line(path, text, number)


def json_line(path: Path, text: str, number: int) -> dict[str, Any]:
    """Line ``number`` of JSON Lines file ``path``: one JSON object, else a DataError that
    names the file and line."""
    try:
        item = loads_json(text, f"{path}:{number}")
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{number}: invalid JSON on line {number} ({exc.msg}, column {exc.colno})",
            "each line of a .jsonl file must be one complete JSON object",
        ) from None
    if not isinstance(item, dict):
        raise DataError(f"{path}:{number}: line {number} is {type(item).__name__}, not an object")
    return item


def _row(path: Path, raw: bytes, number: int) -> Any:
    return Row(_parse(path, raw, number), f"line {number}")


def _scan(path: Path) -> tuple[array, array]:
    """Offsets and line numbers of the non-empty lines, each line checked."""
    offsets, numbers = array("q"), array("q")
    try:
        f = path.open("rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    with f:
        problem = whole_file_problem(f.read(8192))
        if problem:
            raise DataError(f"{path}: {problem[0]}", problem[1])
        f.seek(0)
        position = 0
        for number, line in enumerate(f, start=1):
            raw = line
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
                position += len(codecs.BOM_UTF8)
                line = raw
            if raw.strip():
                _parse(path, raw, number)
                offsets.append(position)
                numbers.append(number)
            position += len(line)
    return offsets, numbers


class Converted(_View):
    """A table's rows as examples, each converted when read (``convert`` is the checked
    conversion of one row; every row was converted once already when the table was read)."""

    def __init__(self, rows: Sequence, convert: Callable[[Any], Any]) -> None:
        self.rows, self.convert = rows, convert

    def __len__(self) -> int:
        return len(self.rows)

    def _item(self, index: int) -> Any:
        return self.convert(self.rows[index])

    def _slice(self, positions: range) -> Converted:
        return Converted(self.rows[positions.start : positions.stop : positions.step], self.convert)

    def __iter__(self) -> Iterator[Any]:
        return (self.convert(row) for row in self.rows)


class Chain(_View):
    """Several sequences one after another."""

    def __init__(self, parts: list[Sequence]) -> None:
        self.parts = [p for p in parts if len(p)]
        self.starts: list[int] = []
        total = 0
        for part in self.parts:
            self.starts.append(total)
            total += len(part)
        self.total = total

    def __len__(self) -> int:
        return self.total

    def _item(self, index: int) -> Any:
        k = bisect.bisect_right(self.starts, index) - 1
        return self.parts[k][index - self.starts[k]]

    def _slice(self, positions: range) -> Picked:
        return Picked(self, array("q", positions))

    def __iter__(self) -> Iterator[Any]:
        for part in self.parts:
            yield from part


class Picked(_View):
    """The items of ``base`` at ``indices``, in that order."""

    def __init__(self, base: Sequence, indices: array) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def _item(self, index: int) -> Any:
        return self.base[self.indices[index]]

    def _slice(self, positions: range) -> Picked:
        return Picked(self.base, array("q", (self.indices[i] for i in positions)))

    def __iter__(self) -> Iterator[Any]:
        return (self.base[i] for i in self.indices)


def is_lazy(items: Sequence) -> bool:
    return isinstance(items, _View)
