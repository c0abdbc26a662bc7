"""Prepared (tokenized) datasets kept on disk and reused while nothing they depend on changes.

The key covers every data setting, each source file's SHA-256, the tokenizer and its
chat template, and the tunelab version; any change makes a new entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tunelab import __version__
from tunelab.config.schema import TuneConfig
from tunelab.data.records import PreparedData, SourceReport
from tunelab.data.rows import Rows, write
from tunelab.files import staged_directory

DATA_KEYS = (
    "datasets", "sequence_len", "train_on_inputs", "val_set_size", "max_examples",
    "dataset_exact_deduplication", "shuffle_merged_datasets", "chat_template",
    "default_system_message", "excess_length_strategy", "seed", "sample_packing",
    "chat_template_jinja", "eot_tokens", "pretraining_dataset", "min_sample_len",
)  # fmt: skip
LAYOUT = 2  # one Arrow stream file per split (train.arrow, eval.arrow) and meta.json
# How much of pretraining_dataset is read depends on these; they matter only with it.
PRETRAINING_KEYS = ("max_steps", "micro_batch_size", "gradient_accumulation_steps")


def _backend_text(backend: Any) -> str:
    """The fast tokenizer's JSON without the truncation and padding of its last call."""
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return json.dumps(spec, sort_keys=True)


def cache_key(config: TuneConfig, sources: list[Any], tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    keys = DATA_KEYS + (PRETRAINING_KEYS if config.pretraining_dataset else ())
    parts = {
        "config": {k: config.model_dump(mode="json")[k] for k in keys},
        "sources": [(s.path, s.format, s.rows, s.sha256) for s in sources],
        "tokenizer": hashlib.sha256(_backend_text(backend).encode()).hexdigest()
        if backend
        else repr(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token],
        "tunelab": __version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def split_file(folder: Path | None, name: str) -> Path | None:
    """Where split ``name`` ('train' or 'eval') of an entry being built is written."""
    return None if folder is None else folder / f"{name}.arrow"


def write_split(folder: Path, name: str, rows: Rows | list) -> Rows | list:
    """Split ``name`` written into the entry being built; an empty split is absent."""
    if not len(rows):
        return []
    return write(folder / f"{name}.arrow", rows)


def load(root: Path, key: str) -> PreparedData | None:
    """The prepared data stored under ``key``, memory-mapped, or None."""
    entry = root / key
    if not (entry / "meta.json").is_file():
        return None
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    if meta.get("layout") != LAYOUT:  # written by an older tunelab: made again
        return None
    splits = {
        name: Rows.from_file(entry / f"{name}.arrow") if (entry / f"{name}.arrow").is_file() else []
        for name in ("train", "eval")
    }
    sources = [SourceReport(**s) for s in meta["sources"]]
    return PreparedData(splits["train"], splits["eval"], sources, meta["stats"], meta["notes"])


def build(root: Path, key: str, make: Callable[[Path], PreparedData]) -> PreparedData:
    """Store what ``make(folder)`` prepares under ``key``: it writes its splits into
    ``folder`` (see :func:`split_file`), which replaces the entry whole once complete."""
    entry = root / key
    with staged_directory(entry) as staging:
        data = make(staging)
        for name, rows in (("train", data.train), ("eval", data.eval)):
            if len(rows) and not (staging / f"{name}.arrow").is_file():
                write_split(staging, name, rows)
        meta = {
            "layout": LAYOUT,
            "sources": [asdict(s) for s in data.sources],
            "stats": data.stats,
            "notes": data.notes,
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    stored = load(root, key)  # the splits memory-mapped where they now lie
    assert stored is not None
    stored.notes = list(data.notes)
    return stored
