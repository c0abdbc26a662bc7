"""``metrics.jsonl``: one JSON object per logged training step or evaluation.

Each record has ``step`` and ``epoch`` and some of ``loss``, ``eval_loss``,
``learning_rate``, ``grad_norm`` and ``tokens_per_second``. Records are only ever
appended (a resumed run first drops those after its checkpoint), so a reader in another
process follows a run with a cursor, its position in the file (:func:`follow_metrics`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Keys copied from the trainer's logs into metrics.jsonl, in this order.
METRIC_KEYS = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second")


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Add one record (it must have a ``step``) as one line at the end of ``path``."""
    assert "step" in record, record
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All the records in ``path``, oldest first (a line cut short left out)."""
    return follow_metrics(path)[0]


def whole_lines(path: Path, offset: int = 0) -> list[tuple[bytes, int]]:
    """The lines written to ``path`` from byte ``offset`` on, each with the offset just past
    it: a reader in another process follows a growing file by its position in it.

    A line not finished yet (one being written, or the last of a killed writer) is left out:
    the next read returns it once it is whole. A file shorter than ``offset`` was rewritten
    (a resumed run drops the records after its checkpoint): it is read again from its
    start. A missing file has no lines."""
    try:
        with path.open("rb") as f:
            if offset > os.fstat(f.fileno()).st_size:
                offset = 0
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return []
    lines = []
    for line in data[: data.rfind(b"\n") + 1].splitlines(keepends=True):
        offset += len(line)
        lines.append((line.rstrip(b"\n"), offset))
    return lines


def follow_metrics(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The records written to ``path`` from byte ``offset`` on, oldest first, and the offset
    to pass next time (see :func:`whole_lines`), so a reader sees every record once, also
    several written at the same step."""
    lines = whole_lines(path, offset)
    records = []
    for line, _ in lines:
        try:
            record = json.loads(line)
        except ValueError:  # also a line that is not UTF-8
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    if lines:
        return records, lines[-1][1]
    return records, offset if path.exists() and offset <= path.stat().st_size else 0
