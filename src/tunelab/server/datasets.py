"""Datasets sent to the server: kept in the lab's ``datasets/`` under names the server
chooses, within a size limit, and previewed as ``tunelab data inspect --json`` shows them
(detected format, rendered samples, trained tokens marked)."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

from fastapi import HTTPException, UploadFile

from tunelab.files import TEMP_PREFIX
from tunelab.server.checks import run_tunelab

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
CHUNK = 1 << 20


def stored_name(original: str) -> str:
    """A safe, new name keeping the original's stem (readable) and suffix (the format)."""
    suffix = Path(original).suffix.lower()
    if suffix not in SUFFIXES:
        raise HTTPException(415, f"{original}: not a data file tunelab reads "
                                 f"({', '.join(SUFFIXES)})")  # fmt: skip
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(original).stem).strip("-")[:60] or "data"
    return f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"


async def save_upload(folder: Path, upload: UploadFile, limit: int) -> Path:
    """Write the upload into ``folder`` (never half-written: beside, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / stored_name(upload.filename or "data.json")
    partial = folder / f"{TEMP_PREFIX}{target.name}"
    size = 0
    try:
        with open(partial, "wb") as out:
            while chunk := await upload.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"{upload.filename}: larger than this server's "
                                             f"limit of {limit // (1 << 20)} MB")  # fmt: skip
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def listing(folder: Path) -> list[dict[str, Any]]:
    if not folder.is_dir():
        return []
    return [
        {"name": p.name, "path": str(p), "bytes": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(TEMP_PREFIX)
    ]


def find(folder: Path, name: str) -> Path:
    path = (folder / name).resolve()
    if path.parent != folder.resolve() or not path.is_file():
        raise HTTPException(404, f"no dataset {name} in this lab")
    return path


def preview(path: Path, base_model: str | None, dataset_format: str | None,
            data_template: str | None, n: int) -> dict[str, Any]:  # fmt: skip
    """What ``tunelab data inspect --json`` says of the file."""
    args = ["data", "inspect", "--data", str(path), "--json", "-n", str(n)]
    for flag, value in (("--base-model", base_model), ("--dataset-format", dataset_format),
                        ("--data-template", data_template)):  # fmt: skip
        if value:
            args += [flag, value]
    return json.loads(run_tunelab(args))
