"""Read raw rows from data files, keeping where each row came from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import DataError


@dataclass(frozen=True)
class Row:
    """One record and its place: ``where`` reads 'line 12' (JSONL) or 'row 3' (JSON array)."""

    data: dict[str, Any]
    where: str


def read_json_rows(path: Path) -> list[Row]:
    """Rows of a JSON array file or a JSON-lines file; bad syntax names file and line."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(path, text)  # JSON lines in a .json file
        raise DataError(
            f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})",
            "fix the file at that line; JSON-lines files should end in .jsonl",
        ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, found {type(data).__name__}")
    rows = []
    for i, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{path}: row {i} is {type(item).__name__}, expected an object")
        rows.append(Row(item, f"row {i}"))
    return rows


def _read_jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{number}: invalid JSON on line {number} ({exc.msg}, column {exc.colno})",
                "each line of a .jsonl file must be one complete JSON object",
            ) from None
        if not isinstance(item, dict):
            raise DataError(
                f"{path}:{number}: line {number} is {type(item).__name__}, expected an object"
            )
        rows.append(Row(item, f"line {number}"))
    return rows


def read_hub_rows(dataset_id: str, split: str) -> list[Row]:
    """Rows of a hub dataset split (needs network access to the hub)."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise DataError(
            "reading hub datasets needs the 'datasets' package", "pip install datasets"
        ) from exc
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise DataError(
            f"could not load hub dataset '{dataset_id}' (split '{split}'): "
            f"{type(exc).__name__}: {exc}",
            "check the id and your network, or download it and give a local file",
        ) from None
    return [Row(dict(item), f"row {i}") for i, item in enumerate(ds, start=1)]
