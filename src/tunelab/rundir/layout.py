"""The run directory's layout: where each file of a run lives, defined here and nowhere else
(the whole layout is described in :mod:`tunelab.rundir`), and how a run directory is
created, replaced and put back.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import RunDirError
from tunelab.files import TEMP_PREFIX, temporary_directory, write_atomic
from tunelab.rundir.status import read_status

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def adapter_config(self) -> Path:
        return self.root / "adapter_config.json"

    @property
    def adapter_weights(self) -> Path:
        return self.root / "adapter_model.safetensors"

    @property
    def full_weights(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def info(self) -> Path:
        return self.root / "adapter_info.json"

    @property
    def card(self) -> Path:
        return self.root / "README.md"

    @property
    def plot(self) -> Path:
        return self.root / "training_history.png"

    @property
    def tensorboard(self) -> Path:
        return self.root / "logs"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def evaluations(self) -> Path:
        return self.root / "evaluations.csv"

    def is_finished(self) -> bool:
        try:
            state = read_status(self.status).state
        except RunDirError:  # an unreadable status is no finished run
            state = None
        return state == "completed" or self.adapter_weights.exists()

    def is_run(self) -> bool:
        """Whether this directory was made by a tunelab run (and so may be replaced)."""
        return self.status.exists() or self.adapter_config.exists() or self.info.exists()


# Run-directory parts that are for the machine that trained, not for a model repository.
NOT_PUSHED = frozenset({"checkpoints", "logs", "status.json", "train.log", "wandb"})


def pushed(relative: Path) -> bool:
    """Whether ``tunelab push`` uploads the file at ``relative`` (a path inside the folder)."""
    return not any(part in NOT_PUSHED or part.startswith(".") for part in relative.parts)


def files_to_push(folder: Path) -> list[Path]:
    """The files ``tunelab push`` uploads from ``folder``: all but what only the training
    machine needs (checkpoints, logs, status, hidden files)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and pushed(p.relative_to(folder)))


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} for a missing or unreadable file (a record not written
    yet). Status files are read with :func:`tunelab.rundir.status.read_status` instead."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def move_into(staging: Path, root: Path) -> None:
    """Move every file of ``staging`` into ``root`` (each an atomic rename), then drop it."""
    for item in staging.iterdir():
        os.replace(item, root / item.name)
    staging.rmdir()


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, to train into a directory that holds another run."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise RunDirError(f"{output_dir}: exists and is not a directory", "choose another --output")
    if not any(output_dir.iterdir()):
        return
    layout = RunLayout(output_dir)
    if overwrite:
        if layout.is_run():
            return
        raise RunDirError(
            f"{output_dir} holds files that are not a tunelab run; "
            "refusing to replace it, even with --overwrite",
            "choose a new or empty --output directory",
        )
    what = "a finished adapter" if layout.is_finished() else "files of another run"
    raise RunDirError(
        f"{output_dir} already holds {what}; nothing was changed",
        "pass --overwrite to replace it, or choose another --output",
    )


def _previous_runs(output_dir: Path) -> list[Path]:
    """The earlier runs an ``--overwrite`` moved aside from ``output_dir`` (normally none)."""
    stem = f"{TEMP_PREFIX}{output_dir.name}.previous-"
    return sorted(p / "run" for p in output_dir.parent.glob(f"{stem}*") if (p / "run").is_dir())


def _completed(layout: RunLayout) -> bool:
    try:
        return read_status(layout.status).state == "completed"
    except RunDirError:
        return False


def recover_swap(output_dir: Path) -> str | None:
    """Undo or finish what a killed ``--overwrite`` left: while a replacement runs, the earlier
    run waits beside ``output_dir`` under a hidden name; unless ``output_dir`` now holds a
    completed run, the earlier one is put back (the killed replacement's files discarded).
    A completed replacement stays, and the earlier run is left for the leftover clean-up.
    Older versions' half-done swaps (``.new-``/``.old-``) are finished too. Says what it did,
    or None. Call it holding the directory's lock."""
    previous = _previous_runs(output_dir)
    if previous and not _completed(RunLayout(output_dir)):
        if output_dir.exists() and any(output_dir.iterdir()):
            if not RunLayout(output_dir).is_run():
                return None  # not ours: touch neither
            shutil.rmtree(output_dir)
        elif output_dir.exists():
            output_dir.rmdir()
        os.replace(previous[-1], output_dir)
        return f"{output_dir}: put the earlier run back (a replacement was cut short)"
    if output_dir.exists():
        return None
    parent, name = output_dir.parent, output_dir.name
    new = [p for p in parent.glob(f"{TEMP_PREFIX}{name}.new-*") if RunLayout(p).is_finished()]
    old = [p / "run" for p in parent.glob(f"{TEMP_PREFIX}{name}.old-*") if (p / "run").is_dir()]
    if new:
        os.replace(new[0], output_dir)
        return f"{output_dir}: put the finished replacement run in place (its swap was cut short)"
    if old:
        os.replace(old[0], output_dir)
        return f"{output_dir}: put the earlier run back (a replacement was cut short)"
    return None


@dataclass
class RunDir:
    """Where a run writes (``layout``, always its final place) and, for a run that replaces
    another, where the earlier run waits (``previous``).

    A replacement run moves the earlier run aside to a hidden sibling when it starts and
    writes at the path itself; the earlier run is deleted when the new one completes, or
    put back when it fails or is interrupted, so a failed run never leaves the old one
    half-overwritten (and :func:`recover_swap` puts it back after a kill).
    """

    layout: RunLayout
    previous: Path | None = None  # the hidden folder holding the earlier run (as ``run``)

    @property
    def final(self) -> Path:
        return self.layout.root

    @property
    def replacing(self) -> bool:
        return self.previous is not None

    @classmethod
    def create(cls, output_dir: Path, overwrite: bool) -> RunDir:
        check_output_dir(output_dir, overwrite)
        output_dir = output_dir.resolve()
        previous = None
        if output_dir.exists() and any(output_dir.iterdir()):
            previous = temporary_directory(output_dir.parent, f"{output_dir.name}.previous")
            os.replace(output_dir, previous / "run")
        output_dir.mkdir(parents=True, exist_ok=True)
        return cls(RunLayout(output_dir), previous)

    def finish(self) -> RunLayout:
        """After the run completed: drop the earlier run it replaced; returns the layout."""
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)
            self.previous = None
        return self.layout

    def abandon(self) -> None:
        """After a failure: put back the earlier run this one replaced, discarding this
        run's files (nothing to do for a run that replaced none)."""
        if self.previous is not None:
            shutil.rmtree(self.final, ignore_errors=True)
            os.replace(self.previous / "run", self.final)
            shutil.rmtree(self.previous, ignore_errors=True)
            self.previous = None
