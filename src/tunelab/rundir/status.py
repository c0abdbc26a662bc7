"""``status.json``: what state a run is in, written in one place and read in one place.

A run writes it atomically at every change (a reader in another process sees the previous
record or the next one, never half of one): ``preparing`` while it loads the model (its
config and data already checked), ``running`` while it trains (``step``, ``epoch``,
``last_loss`` and ``updated`` kept current at each logged step), and at the end
``completed``, ``failed`` or ``interrupted``, with the reason the training stopped and,
for a failure, the message and the way out a user must see.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunelab.errors import RunDirError
from tunelab.files import write_atomic

# 1: this schema. Files written before it (no "version" key) read as version 0.
STATUS_VERSION = 1

State = Literal["preparing", "running", "completed", "failed", "interrupted"]
ENDED: tuple[State, ...] = ("completed", "failed", "interrupted")


def now() -> str:
    """The current time as the status records it: ISO 8601, UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _known(fields: dict[str, Any]) -> None:
    """Refuse a field name the record does not have (a misspelling would be dropped)."""
    unknown = sorted(set(fields) - set(RunStatus.model_fields))
    if unknown:
        raise ValueError(f"a run status has no field {', '.join(unknown)}")


class RunStatus(BaseModel):
    """The record in a run's ``status.json``."""

    # keys a later version adds are dropped on reading, so its runs still list here
    model_config = ConfigDict(extra="ignore")

    version: int = Field(STATUS_VERSION, description="schema version; 0 for older runs")
    state: State = Field(description="preparing, running, completed, failed or interrupted")
    pid: int | None = Field(None, description="the process that runs (or ran) the training")
    host: str | None = Field(None, description="the machine that process runs on")
    started: str | None = Field(None, description="when the run started (ISO 8601, UTC)")
    updated: str | None = Field(None, description="when this record was last written")
    finished: str | None = Field(None, description="when the run ended, however it ended")
    doing: str | None = Field(None, description="what a preparing run is doing now")
    step: int = Field(0, description="optimizer steps done")
    total_steps: int | None = Field(None, description="optimizer steps the run will take")
    epoch: float | None = Field(None, description="epochs done, fractional")
    last_loss: float | None = Field(None, description="the latest logged training loss")
    stop_reason: str | None = Field(None, description="why training ended before its last step")
    error: str | None = Field(None, description="what went wrong, as the user must see it")
    hint: str | None = Field(None, description="the way out of that error")
    fingerprint: dict[str, Any] = Field(
        default_factory=dict, description="what a resumed run must match (data, model, schedule)"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_older_layout(cls, data: Any) -> Any:
        # version 0 recorded the steps done only at the end, as "steps"
        if isinstance(data, dict) and "steps" in data and "step" not in data:
            data = {**data, "step": data["steps"]}
        return data

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @classmethod
    def begin(cls, state: State = "running", **fields: Any) -> RunStatus:
        """A new record for this process, started and updated now."""
        _known(fields)
        stamp = now()
        return cls(
            state=state, pid=os.getpid(), host=socket.gethostname(), started=stamp,
            updated=stamp, **fields,
        )  # fmt: skip

    def changed(self, **fields: Any) -> RunStatus:
        """This record with ``fields`` changed (and checked), updated now. A name that is no
        field of the record is refused (reading drops unknown keys; writing never does)."""
        _known(fields)
        return RunStatus.model_validate({**self.model_dump(), **fields, "updated": now()})


def write_status(path: Path, status: RunStatus) -> None:
    """Replace ``path`` with ``status`` in one atomic rename."""
    write_atomic(path, status.model_dump_json(indent=2) + "\n")


def read_status(path: Path) -> RunStatus:
    """The status record in ``path``, also one written by an older tunelab (missing fields
    take their defaults); a missing file, or one that holds no status record, is a
    :class:`RunDirError` naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunDirError(f"{path}: no such file; this is no tunelab run") from None
    except OSError as exc:
        raise RunDirError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise RunDirError(f"{path}: not a tunelab status record (not UTF-8: {exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RunDirError(f"{path}: not a tunelab status record (not JSON: {exc})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: not a tunelab status record (not a JSON object)")
    try:
        return RunStatus.model_validate({"version": 0, **data})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in exc.errors()
        )
        raise RunDirError(f"{path}: not a tunelab status record ({problems})") from None


class StatusFile:
    """The status of a run this process is running: each change is written at once."""

    def __init__(self, path: Path, status: RunStatus) -> None:
        self.path = path
        self.current = status
        write_status(path, status)

    def update(self, **fields: Any) -> RunStatus:
        self.current = self.current.changed(**fields)
        write_status(self.path, self.current)
        return self.current

    def end(self, state: State, **fields: Any) -> RunStatus:
        return self.update(state=state, finished=now(), doing=None, **fields)
