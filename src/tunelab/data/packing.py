"""Sample packing: several tokenized samples share one training row.

Samples are grouped into rows of at most ``sequence_len`` tokens (best fit, longest
first). Each row keeps its samples apart; at training time transformers'
``DataCollatorWithFlattening`` concatenates them with position ids restarting at 0 for
every sample, which makes the attention mask block-diagonal: no token attends across a
sample boundary, and no loss is taken across one.
"""

from __future__ import annotations

import bisect
from typing import Any


def pack(samples: list[dict[str, list[int]]], capacity: int) -> list[dict[str, Any]]:
    """Rows of samples, each row holding at most ``capacity`` tokens."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]["input_ids"]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row index), sorted
    for i in order:
        size = len(samples[i]["input_ids"])
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (room - size, row))
    return [
        {key: [samples[i][key] for i in row] for key in ("input_ids", "labels")} for row in rows
    ]


def efficiency(rows: list[dict[str, Any]], capacity: int) -> float:
    """Share of the rows' token capacity filled by real tokens."""
    used = sum(len(ids) for row in rows for ids in row["input_ids"])
    return used / (capacity * len(rows)) if rows else 0.0


def is_packed(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and bool(rows[0]["input_ids"]) and isinstance(rows[0]["input_ids"][0], list)
