"""Which files a config that came over HTTP may name: those inside the lab, or under a data
root given to ``tunelab serve --data-root``. Links are followed before deciding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.config.schema import DatasetSource


def _local(value: str) -> bool:
    """A path on this machine, as opposed to a hub id, a built-in name or a database URL."""
    if DatasetSource.database_kind(value):
        return False
    return value.startswith(("/", ".", "~")) or Path(value).exists()


def outside(config: dict[str, Any], allowed: list[Path]) -> list[str]:
    """``key: path`` for each local path in ``config`` that lies outside ``allowed``."""
    found: list[tuple[str, str]] = []
    for key in ("base_model", "lora_model_dir", "dataset_prepared_path", "tokenizer_config"):
        if isinstance(config.get(key), str):
            found.append((key, config[key]))
    for group in ("datasets", "pretraining_dataset"):
        for i, entry in enumerate(config.get(group) or []):
            if isinstance(entry, dict):
                for key in ("path", "format_file"):
                    if isinstance(entry.get(key), str):
                        found.append((f"{group}.{i}.{key}", entry[key]))
    roots = [r.resolve() for r in allowed]
    problems = []
    for key, value in found:
        if not _local(value):
            continue
        real = Path(value).expanduser().resolve()
        if not any(real == r or real.is_relative_to(r) for r in roots):
            problems.append(
                f"{key}: {value} is outside the lab and the data roots this server was given "
                "(tunelab serve --data-root DIR)"
            )
    return problems
