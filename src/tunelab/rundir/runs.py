"""`tunelab runs`: the runs under a folder, their state, and whether each can be resumed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.errors import RunDirError
from tunelab.rundir.checkpoints import complete_checkpoints
from tunelab.rundir.layout import RunLayout, read_json
from tunelab.rundir.status import RunStatus, read_status


def _resumable(layout: RunLayout, status: RunStatus | None) -> str:
    if status is None:
        return "no: its status.json is not a tunelab status record"
    if status.state == "completed":
        return "no: finished (use --continue-from to train it further)"
    if not status.ended:
        return f"no: {status.state} (pid {status.pid} on {status.host})"
    if not complete_checkpoints(layout.checkpoints):
        return "no: no complete checkpoint"
    return "yes"


def describe_run(root: Path) -> dict[str, Any]:
    """One run's record in the run list: what `tunelab runs --json` prints for it."""
    layout = RunLayout(root)
    info = read_json(layout.info)
    try:
        status, problem = read_status(layout.status), None
    except RunDirError as exc:
        status, problem = None, exc.message
    data = info.get("datasets") or []
    date = (status.finished or status.started) if status else None
    return {
        "run": str(root),
        "state": status.state if status else "unreadable",
        "base_model": info.get("base_model", "?"),
        "data": ", ".join(Path(d["path"]).name for d in data) or "?",
        "date": (date or "?")[:16],
        "steps": status.step if status else info.get("steps", "?"),
        "total_steps": status.total_steps if status else None,
        "best_eval_loss": (info.get("losses") or {}).get("best_eval_loss"),
        "resumable": _resumable(layout, status),
        "older_layout": status is not None and status.version == 0,
        "problem": problem or (status.error if status else None),
    }


def list_runs(folder: Path) -> list[dict[str, Any]]:
    """One record per run directory below ``folder`` (the folder itself included)."""
    found = sorted(
        {p.parent for p in folder.rglob("status.json") if not p.parent.name.startswith(".")}
    )
    return [describe_run(root) for root in found]
