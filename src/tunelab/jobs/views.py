"""Jobs, templates, runs and checkpoints as plain records: what the CLI prints with
``--json``, the Python API returns and a page shows. Progress comes from each run's
``status.json``, never from the training process."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunelab.errors import RunDirError
from tunelab.jobs.db import JobRow, TemplateRow
from tunelab.jobs.store import Store
from tunelab.redact import redact_data
from tunelab.rundir import RunLayout, checkpoint_index, checkpoint_step, list_runs, read_status


def _time(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def progress(run_dir: Path) -> dict[str, Any]:
    """step, total_steps, last_loss and an ETA in seconds, from the run's status."""
    try:
        status = read_status(RunLayout(run_dir).status)
    except RunDirError:
        return {}
    record: dict[str, Any] = {
        "run_state": status.state,
        "step": status.step,
        "total_steps": status.total_steps,
        "last_loss": status.last_loss,
        "doing": status.doing,
        "eta_seconds": None,
    }
    if status.state == "running" and status.started and status.step and status.total_steps:
        started = datetime.fromisoformat(status.started)
        elapsed = (datetime.now(UTC) - started).total_seconds()
        remaining = max(status.total_steps - status.step, 0)
        record["eta_seconds"] = round(elapsed / status.step * remaining)
    return record


def job_record(
    store: Store, job: JobRow, events: bool = False, order: list[int] | None = None
) -> dict[str, Any]:
    queue = order if order is not None else (store.queue_order() if job.state == "queued" else [])
    record: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "position": queue.index(job.id) + 1 if job.id in queue else None,
        "template": job.template,
        "group": job.group,
        "owner": job.owner,
        "model_id": job.model_id,
        "request_id": job.request_id,
        "retry_of": job.retry_of,
        "run_dir": job.run_dir,
        "device": job.device,
        "worker": job.worker,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "cancel_requested": job.cancel_requested,
        "exit_code": job.exit_code,
        "error": job.error,
        "hint": job.hint,
        "created": _time(job.created),
        "started": _time(job.started),
        "finished": _time(job.finished),
        "kind": job.kind,
        "progress": progress(Path(job.run_dir)) if job.kind == "train" else {},
        "result": job.result,
    }
    if events:
        record["config"] = redact_data(job.config)  # a database URL's password, masked
        record["events"] = [
            {
                "at": _time(e.at),
                "from": e.from_state,
                "state": e.state,
                "reason": e.reason,
                "worker": e.worker,
            }
            for e in store.events(job.id)
        ]
    return record


def template_record(t: TemplateRow) -> dict[str, Any]:
    return {
        "name": t.name,
        "description": t.description,
        "source": t.source,
        "created": _time(t.created),
        "updated": _time(t.updated),
        "config": t.config,
    }


def run_rows(folder: Path) -> list[dict[str, Any]]:
    return list_runs(folder) if folder.is_dir() else []


def checkpoint_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The run's complete checkpoints by step, with the best and the last marked."""
    index = checkpoint_index(RunLayout(run_dir).checkpoints)
    steps = {
        name: _copied_step(path)
        for name, path in (("best", index.best), ("last", index.last))
        if path
    }
    rows = []
    for path in index.complete:
        step = checkpoint_step(path)
        rows.append(
            {
                "step": step,
                "path": str(path),
                "best": steps.get("best") == step,
                "last": steps.get("last") == step,
            }
        )
    return rows


def evaluation_rows(run_dir: Path) -> list[dict[str, str]]:
    """The run's evaluations table (``evaluations.csv``), a dict per row."""
    import csv

    table = RunLayout(run_dir).evaluations
    if not table.is_file():
        return []
    with open(table, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _copied_step(path: Path) -> int | None:
    import json

    from tunelab.rundir.checkpoints import COPY_RECORD

    try:
        return int(json.loads((path / COPY_RECORD).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
