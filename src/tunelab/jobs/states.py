"""The states a job goes through, and which changes between them are legal.

``queued -> running -> completed | failed | stopped``. A running job whose worker died goes
back to ``queued`` (and resumes from its checkpoint); a queued job cancelled before it
started is ``stopped``. A finished job never changes state again: retrying it queues a new
job that continues the same run.
"""

from __future__ import annotations

from typing import Literal

from tunelab.errors import TunelabError

State = Literal["queued", "running", "completed", "failed", "stopped"]
STATES: tuple[State, ...] = ("queued", "running", "completed", "failed", "stopped")
FINAL: frozenset[str] = frozenset({"completed", "failed", "stopped"})
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "stopped"}),
    "running": frozenset({"queued", "completed", "failed", "stopped"}),
}


class IllegalTransition(TunelabError):
    """A change of state the job's life does not allow (a bug, or a finished job)."""


def check_transition(job: int, current: str, new: str) -> None:
    """Raise :class:`IllegalTransition` unless a job may go from ``current`` to ``new``."""
    if current in FINAL:
        raise IllegalTransition(
            f"job {job} is {current}; a finished job never changes state again",
            f"queue it again with: tunelab jobs retry {job}",
        )
    if new not in TRANSITIONS.get(current, ()):
        raise IllegalTransition(f"job {job} cannot go from {current} to {new}")
