"""The checkpoint index: which checkpoints a run has, which are complete, best and last.

The trainer writes ``checkpoints/checkpoint-N``; once it has finished one, the run writes
the completeness marker :data:`MARKER` into it (``{"step", "epoch", "eval_loss"}``) and
refreshes ``checkpoints/last`` and ``checkpoints/best``, adapter-only copies with that
record as ``checkpoint.json``. A checkpoint without the marker was cut short by a crash
and is never resumed from.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "tunelab-complete.json"
COPY_RECORD = "checkpoint.json"  # in last/ and best/
_NUMBERED = re.compile(r"^checkpoint-(\d+)$")


def numbered_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(N, path) of every ``checkpoint-N`` folder, complete or not, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((int(m[1]), p) for p in folder.iterdir() if (m := _NUMBERED.match(p.name)))


def complete_checkpoints(folder: Path) -> list[Path]:
    """``checkpoint-N`` folders that were written to the end, oldest first."""
    return [p for _, p in numbered_checkpoints(folder) if (p / MARKER).is_file()]


def incomplete_checkpoints(folder: Path) -> list[Path]:
    """``checkpoint-N`` folders a crash left without their completeness marker."""
    return [p for _, p in numbered_checkpoints(folder) if not (p / MARKER).exists()]


def checkpoint_step(path: Path) -> int:
    """The step a complete checkpoint was saved at."""
    return json.loads((path / MARKER).read_text(encoding="utf-8"))["step"]


@dataclass
class CheckpointIndex:
    """A run's checkpoints as they are on disk."""

    complete: list[Path] = field(default_factory=list)  # oldest first
    incomplete: list[Path] = field(default_factory=list)
    last: Path | None = None  # checkpoints/last, the adapter of the latest complete one
    best: Path | None = None  # checkpoints/best, that of the lowest validation loss

    @property
    def latest(self) -> Path | None:
        """The complete checkpoint a resumed run continues from."""
        return self.complete[-1] if self.complete else None


def checkpoint_index(folder: Path) -> CheckpointIndex:
    """The checkpoints in ``folder`` (a run's ``checkpoints/``)."""
    copies = {n: folder / n for n in ("last", "best") if (folder / n / COPY_RECORD).is_file()}
    return CheckpointIndex(
        complete_checkpoints(folder), incomplete_checkpoints(folder),
        copies.get("last"), copies.get("best"),
    )  # fmt: skip
