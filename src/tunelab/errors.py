"""Errors a user can act on.

Every failure that is the user's to fix is raised as a :class:`TunelabError`. The CLI
prints its message (and hint) and exits with its ``exit_code``; no traceback.
"""

from __future__ import annotations


class TunelabError(Exception):
    """A problem the user can fix; the message says what and the hint says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class ConfigError(TunelabError):
    """One or more problems with a configuration, all reported at once."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} with the configuration{where}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class DataError(TunelabError):
    """A dataset that cannot be used: names the file, row or line, and the key."""

    exit_code = 2


class ModelError(TunelabError):
    """A base model that cannot be found or loaded."""

    exit_code = 2


class RunDirError(TunelabError):
    """An output directory that cannot be written without losing work."""

    exit_code = 2


class TrainingFailed(TunelabError):
    """A run that a stopping rule ended as failed (NaN, a diverged or dead model, the loss
    watchdog)."""

    exit_code = 1


class RunInterrupted(TunelabError):
    """A signal stopped the run after it saved a checkpoint."""

    exit_code = 130


class PreflightError(TunelabError):
    """The configuration is valid but cannot run on this machine."""

    exit_code = 2
