"""``metrics.jsonl``: one JSON object per logged training step or evaluation.

Each record has ``step`` and ``epoch`` and some of ``loss``, ``eval_loss``,
``learning_rate``, ``grad_norm`` and ``tokens_per_second``. Records are only ever
appended (a resumed run first drops those after its checkpoint), so a reader in another
process follows a run with a cursor: every record after the last step it has seen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Keys copied from the trainer's logs into metrics.jsonl, in this order.
METRIC_KEYS = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second")


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Add one record (it must have a ``step``) as one line at the end of ``path``."""
    assert "step" in record, record
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path, after: int | None = None) -> list[dict[str, Any]]:
    """The records in ``path``, oldest first; with ``after``, only those of later steps.

    A line cut short (a run killed while writing it, or one still being written) is left
    out: the next read after the writer finishes it returns it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            if after is None or record["step"] > after:
                records.append(record)
    return records
