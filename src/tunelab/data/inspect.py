"""`tunelab data inspect`: what tunelab made of a dataset, before any training."""

from __future__ import annotations

import json
from itertools import groupby
from typing import Any

from tunelab.data.packing import is_packed
from tunelab.data.records import PreparedData
from tunelab.data.tokenize import IGNORE_INDEX


def segments_of(item: dict[str, list[int]], tokenizer: Any) -> list[dict[str, Any]]:
    """The training text of one sample as runs of trained / untrained tokens.

    Built from the token ids and labels actually trained on, so the texts joined are
    the decoded training text, cuts included.
    """
    pairs = zip(item["input_ids"], item["labels"], strict=True)
    runs = groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX)
    return [
        {"text": tokenizer.decode([i for i, _ in run]), "trained": trained} for trained, run in runs
    ]


def _samples(rows: list[dict[str, Any]], n: int) -> list[dict[str, list[int]]]:
    """The first ``n`` samples, taken out of their packed rows if packed."""
    if not is_packed(rows):
        return rows[:n]
    flat = [
        {"input_ids": ids, "labels": labels}
        for row in rows
        for ids, labels in zip(row["input_ids"], row["labels"], strict=True)
    ]
    return flat[:n]


def report(data: PreparedData, tokenizer: Any, n: int) -> dict[str, Any]:
    """The inspection as one JSON-ready object."""
    return {
        "files": [{"path": s.path, "format": s.format, "rows": s.rows} for s in data.sources],
        "stats": data.stats,
        "notes": data.notes,
        "examples": [
            {"segments": segments_of(item, tokenizer)} for item in _samples(data.train, n)
        ],
    }


def print_report(rep: dict[str, Any], console: Any = None) -> None:
    """A readable inspection; trained text is green on a terminal, else inside [[ ]]."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console(highlight=False, soft_wrap=True)
    for f in rep["files"]:
        console.print(f"file: {f['path']}  format: {f['format']}  rows: {f['rows']}")
    for note in rep["notes"]:
        console.print(f"note: {note}")
    st = rep["stats"]
    console.print(
        f"examples: {st['examples']} after removing {st['duplicates']} duplicates; "
        f"{st['train_samples']} training and {st['eval_samples']} validation samples"
    )
    console.print(
        f"tokens per sample: min {st['min_length']}, median {st['median_length']}, "
        f"mean {st['mean_length']}, max {st['max_length']}; "
        f"{st['truncated']} truncated, {st['dropped']} dropped; "
        f"{st['trained_tokens']} of {st['train_tokens']} training tokens are trained"
    )
    if "packed_rows" in st:
        console.print(
            f"packing: {st['packed_rows']} rows, {st['samples_per_row']} samples per row, "
            f"{st['packing_efficiency']:.1%} of each row filled"
        )
    marks = not console.is_terminal
    for k, example in enumerate(rep["examples"], start=1):
        console.rule(f"example {k}" + ("  (trained text inside [[ ]])" if marks else ""))
        text = Text()
        for seg in example["segments"]:
            if seg["trained"]:
                text.append(f"[[{seg['text']}]]" if marks else seg["text"], style="bold green")
            else:
                text.append(seg["text"], style="dim" if not marks else "")
        console.print(text)


def dump_json(rep: dict[str, Any]) -> str:
    return json.dumps(rep, ensure_ascii=False, indent=1)
