"""What needs torch, done without importing it here: a ``tunelab`` command in a process of
its own, its error read back as data (``TUNELAB_RESULT_FILE``): the same problems, message
and hint the CLI prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tunelab.config import LoadedConfig
from tunelab.errors import ConfigError, TunelabError
from tunelab.jobs.submit import given_config

TIMEOUT = 600


def run_tunelab(args: list[str], timeout: float = TIMEOUT) -> str:
    """``tunelab ARGS``'s standard output; its error raised as the command reported it."""
    with tempfile.TemporaryDirectory(prefix="tunelab-call-") as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "TUNELAB_RESULT_FILE": str(result)}
        done = subprocess.run(
            [sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, env=env,
            timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode == 0:
            return done.stdout
        try:
            record = json.loads(result.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            raise TunelabError(f"tunelab {args[0]} failed: {tail[0]}") from None
    if record.get("problems"):
        raise ConfigError(record["problems"])
    raise TunelabError(record.get("error") or f"tunelab {args[0]} failed", record.get("hint"))


def validate_in_subprocess(loaded: LoadedConfig) -> None:
    """Raise what ``tunelab validate`` would raise on this config; return if it is valid."""
    with tempfile.TemporaryDirectory(prefix="tunelab-check-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(given_config(loaded), sort_keys=False), encoding="utf-8")
        run_tunelab(["validate", str(config)])


def problem_row(text: str) -> dict[str, str]:
    """One problem the CLI prints (``path: message``) as data: its dotted path apart."""
    path, sep, message = text.partition(": ")
    dotted = sep and " " not in path
    return {"path": path if dotted else "", "message": message if dotted else text}
