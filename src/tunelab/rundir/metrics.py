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


def follow_metrics(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The records written to ``path`` from byte ``offset`` on, oldest first, and the offset
    to pass next time: a reader in another process follows a run by its position in the
    file, so it sees every record once, also several written at the same step.

    A line not finished yet (one being written, or the last of a killed run) is left out
    and not passed: the next read returns it once the writer has finished it. A file
    shorter than ``offset`` was rewritten (a resumed run drops the records after its
    checkpoint): it is read again from its start."""
    try:
        with path.open("rb") as f:
            if offset > os.fstat(f.fileno()).st_size:
                offset = 0
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1  # only whole lines
    records = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # also a line that is not UTF-8
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records, offset + end
