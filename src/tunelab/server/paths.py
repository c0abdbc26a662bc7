"""Which files a config that came over HTTP may name: those in the lab's datasets and runs,
or under a data root given to ``tunelab serve --data-root``. Links are followed before
deciding; databases other than SQLite files (which count as files) are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tunelab.config.locations import sqlite_file
from tunelab.config.schema import DatasetSource
from tunelab.redact import redact

# top-level keys whose value may be a local path
FILE_KEYS = ("base_model", "lora_model_dir", "dataset_prepared_path", "tokenizer_config",
             "chat_template", "chat_template_jinja")  # fmt: skip
ENTRY_KEYS = ("path", "format_file", "data_files")


TEMPLATE_KEYS = ("chat_template", "chat_template_jinja")  # a file's name or template text


def _local(key: str, value: str) -> bool:
    """A path on this machine, as opposed to a hub id, a built-in name or template text."""
    text = "\n" in value or "{{" in value or "{%" in value
    if key in TEMPLATE_KEYS and text:  # the template itself, not a file name
        return False
    return value.startswith(("/", ".", "~")) or Path(value).expanduser().exists()


def _named(config: dict[str, Any]) -> list[tuple[str, str]]:
    found = [(k, config[k]) for k in FILE_KEYS if isinstance(config.get(k), str)]
    uri = config.get("mlflow_tracking_uri")
    if isinstance(uri, str) and uri.startswith("file:"):
        found.append(("mlflow_tracking_uri", urlsplit(uri).path))
    for group in ("datasets", "pretraining_dataset"):
        for i, entry in enumerate(config.get(group) or []):
            if not isinstance(entry, dict):
                continue
            for key in ENTRY_KEYS:
                values = entry.get(key)
                for value in values if isinstance(values, list) else [values]:
                    if isinstance(value, str):
                        found.append((f"{group}.{i}.{key}", value))
    return found


def outside(config: dict[str, Any], allowed: list[Path]) -> list[str]:
    """``key: path`` for each local file ``config`` names outside ``allowed``."""
    roots = [r.resolve() for r in allowed]
    problems = []
    for key, value in _named(config):
        database = DatasetSource.database_kind(value)
        if database and database != "sqlite":
            problems.append(f"{key}: {redact(value)}: a request may read no database but an "
                            "SQLite file in the lab or a data root")  # fmt: skip
            continue
        if database == "sqlite":
            value = str(sqlite_file(value))
        elif not _local(key, value):
            continue
        real = Path(value).expanduser().resolve()
        if not any(real == r or real.is_relative_to(r) for r in roots):
            problems.append(
                f"{key}: {value} is outside the lab's datasets and runs and the data roots "
                "this server was given (tunelab serve --data-root DIR)"
            )
    return problems


def run_folder(runs: Path, name: str) -> Path:
    """The run ``name`` of the lab's ``runs`` folder; 404 for anything else (``..`` too)."""
    from fastapi import HTTPException

    folder = (runs / name).resolve()
    if folder.parent != runs.resolve() or not folder.is_dir():
        raise HTTPException(404, f"no run {name} in this lab")
    return folder
