"""A job's training process: started in its own process group with its output in a file,
told to stop when its worker dies, and recognised again by its pid and start time."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1


def stop_with_parent(parent: int) -> None:
    """In the child, before exec: SIGTERM when the worker dies (the run saves a checkpoint
    and stops), even when the worker is SIGKILLed and can stop nothing itself."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "prctl"):  # Linux only; elsewhere the lease alone tells
        return
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the worker died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def start(args: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path) -> subprocess.Popen:
    """Run ``args`` in a new session (its own process group), stdout and stderr appended to
    ``log``, stdin closed. Call from the thread that lives as long as the worker."""
    log.parent.mkdir(parents=True, exist_ok=True)
    parent = os.getpid()
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(args),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=lambda: stop_with_parent(parent),
        )


def start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc): with the pid, it
    names one process even after the pid is reused. None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has ended


def alive(pid: int, started: str | None) -> bool:
    """Whether process ``pid`` is still the one that started at ``started``."""
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group ``pid`` leads (the job's process and its children)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(pid: int, started: str | None, grace: float) -> None:
    """SIGTERM the job's process group, SIGKILL it if it is still there after ``grace``
    seconds; returns once the process is gone."""
    if not alive(pid, started):
        return
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive(pid, started) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid, started):
        signal_group(pid, signal.SIGKILL)
        while alive(pid, started):
            time.sleep(0.1)
