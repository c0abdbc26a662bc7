"""`tunelab runs`: the trained runs under a folder, and whether each can be resumed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.train.checkpoints import complete_checkpoints
from tunelab.train.rundir import RunLayout, read_json


def _resumable(layout: RunLayout, state: str) -> str:
    if state == "completed":
        return "no: finished (use --continue-from to train it further)"
    if not complete_checkpoints(layout.checkpoints):
        return "no: no complete checkpoint"
    return "yes"


def list_runs(folder: Path) -> list[dict[str, Any]]:
    """One record per run directory below ``folder`` (the folder itself included)."""
    found = sorted(
        {p.parent for p in folder.rglob("status.json") if not p.parent.name.startswith(".")}
    )
    runs = []
    for root in found:
        layout = RunLayout(root)
        status, info = read_json(layout.status), read_json(layout.info)
        state = status.get("state", "unknown")
        data = info.get("datasets") or []
        runs.append({
            "run": str(root),
            "state": state,
            "base_model": info.get("base_model", "?"),
            "data": ", ".join(Path(d["path"]).name for d in data) or "?",
            "date": (status.get("finished") or status.get("started") or "?")[:16],
            "steps": status.get("steps", info.get("steps", "?")),
            "best_eval_loss": (info.get("losses") or {}).get("best_eval_loss"),
            "resumable": _resumable(layout, state),
        })  # fmt: skip
    return runs
