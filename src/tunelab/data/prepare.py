"""Sources -> validated examples -> train/validation split -> token ids and labels.

Every row is read and checked before any model is loaded; problems name the file, the
row or line, and the key.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config.locations import data_path_problem
from tunelab.config.schema import DatasetSource, TuneConfig
from tunelab.data.formats import FORMATS, Format, Message, RowError, describe_formats, detect_format
from tunelab.data.rows import Row, read_hub_rows, read_json_rows
from tunelab.data.tokenize import IGNORE_INDEX, TemplateError, render_segments, tokenize_segments
from tunelab.errors import DataError


@dataclass(frozen=True)
class Example:
    """One conversation and where it came from."""

    messages: list[Message]
    source: str
    where: str


@dataclass(frozen=True)
class SourceReport:
    path: str
    format: str
    rows: int
    sha256: str | None  # None for hub datasets


@dataclass
class PreparedData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    sources: list[SourceReport]
    stats: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _choose_format(source: DatasetSource, rows: list[Row], name: str) -> Format:
    if source.type != "auto":
        return FORMATS[source.type]
    columns = sorted({key for row in rows[:100] for key in row.data})
    fmt = detect_format(columns)
    if fmt is None:
        raise DataError(
            f"{name}: cannot tell the format from its columns {columns}",
            f"this version reads: {describe_formats()}; "
            "rename the columns or set the dataset's type",
        )
    return fmt


def _convert(rows: list[Row], fmt: Format, name: str) -> list[Example]:
    examples, failures = [], Counter()
    first: dict[str, str] = {}
    for row in rows:
        try:
            examples.append(Example(fmt.to_messages(row.data), name, row.where))
        except RowError as exc:
            failures[str(exc)] += 1
            first.setdefault(str(exc), row.where)
    if failures:
        lines = [
            f"{count} row{'s' if count > 1 else ''}: {problem} (first at {first[problem]})"
            for problem, count in failures.most_common()
        ]
        raise DataError(
            f"{name}: {sum(failures.values())} of {len(rows)} rows "
            f"cannot be read as {fmt.name}:\n  " + "\n  ".join(lines),
            f"every {fmt.name} row needs {', '.join(repr(c) for c in fmt.required)} as text",
        )
    return examples


def load_examples(
    config: TuneConfig, read_hub: bool = True
) -> tuple[list[Example], list[SourceReport]]:
    """Read and check every row of every source; no tokenizer or model needed.

    With ``read_hub=False`` hub datasets are skipped (nothing is downloaded).
    """
    examples: list[Example] = []
    reports: list[SourceReport] = []
    for source in config.datasets:
        path = Path(source.path).expanduser()
        problem = data_path_problem(source.path)
        if problem:
            raise DataError(problem)
        if path.is_file():
            rows, digest = read_json_rows(path), _sha256(path)
        elif read_hub:
            rows, digest = read_hub_rows(source.path, source.split), None
        else:
            continue
        if not rows:
            raise DataError(f"{source.path}: the dataset is empty (no rows)", "add examples to it")
        fmt = _choose_format(source, rows, source.path)
        examples += _convert(rows, fmt, source.path)
        name = str(path.resolve()) if digest else source.path
        reports.append(SourceReport(name, fmt.name, len(rows), digest))
    return examples, reports


def split_examples(examples: list[Example], val_set_size: float, seed: int) -> tuple[list, list]:
    """Shuffle with ``seed`` and hold out a share (< 1) or a count (>= 1) for validation."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = int(val_set_size) if val_set_size >= 1 else int(len(examples) * val_set_size)
    if n_val >= len(examples):
        raise DataError(
            f"val_set_size {val_set_size} leaves no rows to train on ({len(examples)} rows in all)",
            "use a smaller val_set_size",
        )
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val


def tokenize_examples(
    examples: list[Example], tokenizer: Any, sequence_len: int, train_on_inputs: bool
) -> tuple[list[dict[str, list[int]]], Counter]:
    """Token ids, attention mask and labels; samples past ``sequence_len`` are cut."""
    out, counts = [], Counter()
    for ex in examples:
        try:
            segments = render_segments(ex.messages, tokenizer, train_on_inputs)
        except TemplateError as exc:
            raise DataError(f"{ex.source}: {ex.where}: {exc}") from None
        ids, labels = tokenize_segments(segments, tokenizer)
        if len(ids) > sequence_len:
            counts["truncated"] += 1
            ids, labels = ids[:sequence_len], labels[:sequence_len]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            counts["dropped"] += 1  # nothing left to learn from after the cut
            continue
        counts["tokens"] += len(ids)
        counts["trained_tokens"] += sum(label != IGNORE_INDEX for label in labels[1:])
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out, counts


def prepare_data(config: TuneConfig, tokenizer: Any, examples_and_sources=None) -> PreparedData:
    """The whole data step for a run. ``examples_and_sources`` reuses :func:`load_examples`."""
    examples, sources = examples_and_sources or load_examples(config)
    train_ex, val_ex = split_examples(examples, config.val_set_size, config.seed)
    train, train_counts = tokenize_examples(
        train_ex, tokenizer, config.sequence_len, config.train_on_inputs
    )
    val, val_counts = tokenize_examples(
        val_ex, tokenizer, config.sequence_len, config.train_on_inputs
    )
    if not train:
        raise DataError(
            f"nothing left to train on: all {len(train_ex)} training samples lost their response "
            f"when cut to sequence_len={config.sequence_len}",
            "raise sequence_len or shorten the prompts",
        )
    counts = train_counts + val_counts
    lengths = [len(x["input_ids"]) for x in train]
    stats = {
        "rows": len(examples),
        "train_samples": len(train),
        "eval_samples": len(val),
        "truncated": counts["truncated"],
        "dropped": counts["dropped"],
        "train_tokens": train_counts["tokens"],
        "trained_tokens": train_counts["trained_tokens"],
        "max_length": max(lengths),
        "mean_length": round(sum(lengths) / len(lengths), 1),
    }
    return PreparedData(train, val, sources, stats)
