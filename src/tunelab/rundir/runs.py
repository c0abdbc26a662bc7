"""`tunelab runs`: the runs under a folder, their state, and whether each can be resumed.

A run whose status says ``preparing`` or ``running`` but whose process is gone (no process
holds the directory's lock) is listed as ``stale``, and can be resumed from its last
complete checkpoint like an interrupted one."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Any

from tunelab.errors import RunDirError
from tunelab.files import lock_path
from tunelab.rundir.checkpoints import complete_checkpoints
from tunelab.rundir.layout import RunLayout, read_json
from tunelab.rundir.status import RunStatus, read_status


def _lock_held(root: Path) -> bool:
    """Whether a process holds the lock ``tunelab train`` takes on run directory ``root``."""
    try:
        fd = os.open(lock_path(root), os.O_RDONLY)
    except OSError:  # no lock file: nobody holds it (a holder removes it as it ends)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks: say nothing we cannot know
        return True
    finally:
        os.close(fd)  # also lets go of the lock taken just now
    return False


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_stale(root: Path, status: RunStatus) -> bool:
    """A run whose status says it is preparing or running, though its process is gone (killed
    by SIGKILL or the OOM killer before it could say so). Only a run of this machine is
    judged: it is stale when its pid is gone, or when that pid (now another process's) does
    not hold the lock ``tunelab train`` keeps on the directory while it runs."""
    if status.ended or status.pid is None or status.host != socket.gethostname():
        return False
    if not _process_exists(status.pid):
        return True
    return not _lock_held(root.resolve())


def _resumable(layout: RunLayout, status: RunStatus | None, stale: bool) -> str:
    if status is None:
        return "no: its status.json is not a tunelab status record"
    if status.state == "completed":
        return "no: finished (use --continue-from to train it further)"
    if not status.ended and not stale:
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
    stale = status is not None and is_stale(root, status)
    if stale:
        problem = (
            f"{status.state}, but its process (pid {status.pid}) is gone: it was killed "
            "before it could record how it ended"
        )
    state = "stale" if stale else status.state if status else "unreadable"
    return {
        "run": str(root),
        "state": state,
        "base_model": info.get("base_model", "?"),
        "data": ", ".join(Path(d["path"]).name for d in data) or "?",
        "date": (date or "?")[:16],
        "steps": status.step if status else info.get("steps", "?"),
        "total_steps": status.total_steps if status else None,
        "best_eval_loss": (info.get("losses") or {}).get("best_eval_loss"),
        "resumable": _resumable(layout, status, stale),
        "older_layout": status is not None and status.version == 0,
        "problem": problem or (status.error if status else None),
    }


def list_runs(folder: Path) -> list[dict[str, Any]]:
    """One record per run directory below ``folder`` (the folder itself included)."""
    found = sorted(
        p.parent
        for p in folder.rglob("status.json")
        if not any(part.startswith(".") for part in p.parent.relative_to(folder).parts)
    )
    return [describe_run(root) for root in found]
