"""A lab: the directory that holds the job store (unless ``TUNELAB_DB`` names a shared
PostgreSQL one), the runs its jobs train, their logs, and the key that keeps a job's
credentials unreadable in the store.

::

    LAB/
      lab.db            the SQLite store (templates, jobs, job events)
      runs/NAME/        each job's run directory (the run-directory contract)
      logs/ID.log       each job's console output: what `tunelab train` printed
      jobs/ID/          what a job's process is given: its config.yaml
      datasets/         files sent to `tunelab serve`, under names it chose
      secret.key        encrypts credentials in the store (mode 600; TUNELAB_SECRET_KEY wins)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.files import write_atomic

DEFAULT_LAB = Path("~/.local/share/tunelab/lab")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def lab_path(given: str | Path | None = None) -> Path:
    """``--lab``, else ``TUNELAB_LAB``, else ``~/.local/share/tunelab/lab``."""
    chosen = given or os.environ.get("TUNELAB_LAB") or DEFAULT_LAB
    return Path(chosen).expanduser().resolve()


def check_name(name: str, what: str) -> str:
    """A name that is safe as a file name and readable in a listing."""
    if not NAME.match(name or "") or name in (".", ".."):
        raise TunelabError(
            f"{what} '{name}' is not a usable name",
            "use letters, digits, '.', '_' and '-' (up to 100, starting with a letter or digit)",
        )
    return name


class LabPaths:
    """Where a lab keeps what it keeps."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs = root / "runs"
        self.logs = root / "logs"
        self.spool = root / "jobs"
        self.datasets = root / "datasets"
        self.database = root / "lab.db"
        self.key_file = root / "secret.key"

    def create(self) -> None:
        for folder in (self.root, self.runs, self.logs, self.spool):
            folder.mkdir(parents=True, exist_ok=True)

    def store_url(self) -> str:
        return os.environ.get("TUNELAB_DB") or f"sqlite:///{self.database}"

    def log(self, job_id: int) -> Path:
        return self.logs / f"{job_id}.log"

    def job_dir(self, job_id: int) -> Path:
        return self.spool / str(job_id)


def _key(paths: LabPaths) -> bytes:
    from cryptography.fernet import Fernet

    given = os.environ.get("TUNELAB_SECRET_KEY")
    if given:
        return given.encode()
    if not paths.key_file.exists():
        paths.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(paths.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key())
    return paths.key_file.read_bytes().strip()


def seal(paths: LabPaths, secrets: dict[str, str]) -> str | None:
    """``secrets`` encrypted for the store; None when there are none."""
    from cryptography.fernet import Fernet

    kept = {k: v for k, v in secrets.items() if v}
    return Fernet(_key(paths)).encrypt(json.dumps(kept).encode()).decode() if kept else None


def unseal(paths: LabPaths, sealed: str | None) -> dict[str, str]:
    from cryptography.fernet import Fernet, InvalidToken

    if not sealed:
        return {}
    try:
        return json.loads(Fernet(_key(paths)).decrypt(sealed.encode()))
    except (InvalidToken, ValueError):
        raise TunelabError(
            "this job's credentials cannot be read on this machine",
            "give every machine that shares the store the same TUNELAB_SECRET_KEY (the "
            "contents of secret.key in the lab where the job was queued)",
        ) from None


def write_job_config(paths: LabPaths, job_id: int, config: dict[str, Any]) -> Path:
    import yaml

    path = paths.job_dir(job_id) / "config.yaml"
    write_atomic(path, yaml.safe_dump(config, sort_keys=False))
    return path
