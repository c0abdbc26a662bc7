"""``pretraining_dataset``: text streamed for pre-training, read only as far as training needs.

Rows are read one at a time (a hub dataset through ``datasets``' streaming mode; local
JSON lines, CSV, Parquet files a line or a batch at a time). Each row's ``field`` column
(default ``text``) is one document, tokenized as axolotl's streamed pre-training tokenizes
it (its default ``type: pretrain``, :func:`~tunelab.data.documents.pretrain_windows`): the
tokenizer's overlapping windows of ``sequence_len - 1`` tokens, each with the tokenizer's
special tokens (its BOS where it adds one) and followed by the EOS token, every token
trained. Each window is a sample of its own: documents are never joined in one sample, and
with ``sample_packing`` the windows share rows without attending across each other (as
axolotl's ``pretrain_multipack_attn``). Reading stops as soon as there are enough windows for
``max_steps`` updates (with ``sample_packing``, enough tokens to fill that many rows); the
rest of the data is never read. A ``.txt`` file is one document, as for ``type: raw``.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config.locations import data_path_problem, split_paths
from tunelab.config.schema import DatasetSource, TuneConfig
from tunelab.data.documents import pretrain_windows
from tunelab.data.formats import RowError, text_field
from tunelab.data.sources import FILE_SUFFIXES, read_json
from tunelab.errors import DataError
from tunelab.redact import redact
from tunelab.textfile import loads_json


@dataclass(frozen=True)
class Piece:
    """One document: the text of a row (or of a whole ``.txt`` file)."""

    text: str
    where: str


@dataclass
class PretrainingRead:
    """The windows read (``chunks``), with how many rows each source gave."""

    chunks: list[dict[str, list[int]]] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # source name -> rows read
    notes: list[str] = field(default_factory=list)


def chunks_needed(config: TuneConfig) -> int:
    """Rows that ``max_steps`` updates take: one per sample of every micro-batch."""
    if config.max_steps is None:
        raise DataError("pretraining_dataset needs max_steps", "set max_steps")
    return config.max_steps * (config.micro_batch_size or 1) * config.gradient_accumulation_steps


def check_sources(config: TuneConfig) -> list[str]:
    """Check each ``pretraining_dataset`` path names something (nothing is read yet)."""
    notes = []
    for source in config.pretraining_dataset or []:
        if DatasetSource.database_kind(source.path):
            raise DataError(
                f"pretraining_dataset: {redact(source.path)}: rows from a database are not "
                "streamed",
                "put it under datasets, with its query and type: pretrain",
            )
        problem = data_path_problem(source.path)
        if problem:
            raise DataError(f"pretraining_dataset: {problem}")
        notes.append(
            f"pretraining_dataset {source.path}: streamed; rows are read while the data is "
            f"prepared, only as many as {chunks_needed(config)} training rows need"
        )
        if source.type not in ("auto", "pretrain"):
            notes.append(
                f"pretraining_dataset {source.path}: type {source.type} is not used; its rows "
                "are read as type pretrain"
            )
    return notes


# --- reading rows lazily ----------------------------------------------------------------


def _json_lines(path: Path, column: str) -> Iterator[Piece]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = loads_json(line, where)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(item, dict):
                raise DataError(f"{where}: line {number} is {type(item).__name__}, not an object")
            yield _piece(item, column, where)


def _text_file(path: Path) -> Iterator[Piece]:
    with path.open(encoding="utf-8", newline=None) as f:
        yield Piece(f.read(), str(path))


def _csv_rows(path: Path, column: str) -> Iterator[Piece]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for record in reader:
            yield _piece(record, column, f"{path}:{reader.line_num}")


def _parquet_rows(path: Path, column: str) -> Iterator[Piece]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own error types
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=256):
        for item in batch.to_pylist():
            number += 1
            yield _piece(item, column, f"{path}: row {number}")


def _file_pieces(path: Path, column: str) -> Iterator[Piece]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _json_lines(path, column)
    elif suffix == ".txt":
        yield from _text_file(path)
    elif suffix == ".csv":
        yield from _csv_rows(path, column)
    elif suffix == ".parquet":
        yield from _parquet_rows(path, column)
    elif suffix == ".json":  # a JSON array is read whole; JSON lines are streamed
        for row in read_json(path):
            yield _piece(row.data, column, f"{path}: {row.where}")
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}'", f"use {FILE_SUFFIXES}")


def _hub_pieces(source: DatasetSource, part: str, column: str) -> Iterator[Piece]:
    import datasets

    dataset_id, _, split = part.partition(":")
    split = split or source.split
    try:
        stream = datasets.load_dataset(
            dataset_id, name=source.name, split=split, data_files=source.data_files, streaming=True
        )
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise DataError(
            f"pretraining_dataset: could not stream hub dataset '{dataset_id}' (split "
            f"'{split}'): {type(exc).__name__}: {exc}",
            "check the id and your network, or download it and give a local file",
        ) from None
    for number, item in enumerate(stream, start=1):
        yield _piece(dict(item), column, f"{dataset_id}:{split}: row {number}")


def _piece(row: dict[str, Any], column: str, where: str) -> Piece:
    try:
        return Piece(text_field(row, column, required=True), where)
    except RowError as exc:
        raise DataError(
            f"{where}: {exc}", "set the pretraining dataset's field to the text column"
        ) from None


def _files(part: str) -> list[Path] | None:
    """The local files a path part names, in order; None for a hub id."""
    p = Path(part).expanduser()
    if any(ch in part for ch in "*?["):
        return sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FILE_SUFFIXES)
    return None


def source_pieces(source: DatasetSource) -> Iterator[tuple[str, Piece]]:
    """(name of the file or dataset, piece) for every row of ``source``, read lazily."""
    column = source.field or "text"
    for part in split_paths(source.path):
        files = _files(part)
        if files is None:
            for piece in _hub_pieces(source, part, column):
                yield part, piece
            continue
        for path in files:
            for piece in _file_pieces(path, column):
                yield str(path), piece


# --- tokens and windows -----------------------------------------------------------------


def read_pretraining(config: TuneConfig, tokenizer: Any) -> PretrainingRead:
    """Windows (see the module docstring) from ``pretraining_dataset``, read only as far as
    :func:`chunks_needed` rows take; notes say how many rows were read."""
    needed, size = chunks_needed(config), config.sequence_len
    read = PretrainingRead()
    tokens = 0

    def enough() -> bool:  # packed windows share rows: count the tokens that fill them
        return tokens >= needed * size if config.sample_packing else len(read.chunks) >= needed

    for source in config.pretraining_dataset or []:
        if enough():
            read.notes.append(f"pretraining_dataset {source.path}: not read (enough rows)")
            continue
        pieces, taken = source_pieces(source), 0
        for name, piece in pieces:
            if source.max_examples is not None and taken >= source.max_examples:
                pieces.close()
                break
            taken += 1
            read.rows[name] = read.rows.get(name, 0) + 1
            try:
                windows = pretrain_windows(piece.text, tokenizer, size)
            except DataError as exc:
                raise DataError(f"{piece.where}: {exc.message}", exc.hint) from None
            for window in windows:
                if enough():
                    break
                if len(window) < 2:  # an empty row's lone EOS: axolotl drops it too
                    continue
                read.chunks.append(_chunk(window))
                tokens += len(window)
            if enough():
                pieces.close()  # stop reading: the rest of the data is never opened
                break
    read.notes += _notes(config, read, needed, enough())
    return read


def _chunk(ids: list[int]) -> dict[str, list[int]]:
    return {"input_ids": list(ids), "attention_mask": [1] * len(ids), "labels": list(ids)}


def _notes(config: TuneConfig, read: PretrainingRead, needed: int, enough: bool) -> list[str]:
    rows = sum(read.rows.values())
    names = ", ".join(read.rows) or "nothing"
    steps = (
        f"max_steps {config.max_steps} x micro_batch_size {config.micro_batch_size or 1} x "
        f"gradient_accumulation_steps {config.gradient_accumulation_steps}"
    )
    windows = f"{len(read.chunks)} windows of at most {config.sequence_len} tokens"
    rows_needed = f"{needed} rows" + (" (packed)" if config.sample_packing else "")
    if enough:
        return [
            f"pretraining_dataset: read {rows} rows ({names}) into {windows}, enough for the "
            f"{rows_needed} that {steps} need; the rest is not read"
        ]
    return [
        f"pretraining_dataset: all {rows} rows ({names}) gave {windows}, fewer than the "
        f"{rows_needed} that {steps} need; training goes over them more than once"
    ]
