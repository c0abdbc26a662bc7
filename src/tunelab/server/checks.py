"""Checking a config without importing torch here: ``tunelab validate`` in a process of its
own, its problems read back as data (``TUNELAB_RESULT_FILE``), the same list the CLI prints."""

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


def validate_in_subprocess(loaded: LoadedConfig) -> None:
    """Raise what ``tunelab validate`` would raise on this config (a ConfigError keeps its
    list of problems); return when it is valid."""
    with tempfile.TemporaryDirectory(prefix="tunelab-check-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(given_config(loaded), sort_keys=False), encoding="utf-8")
        result = Path(tmp) / "result.json"
        env = {**os.environ, "TUNELAB_RESULT_FILE": str(result)}
        done = subprocess.run(
            [sys.executable, "-m", "tunelab", "validate", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
            timeout=TIMEOUT, check=False,
        )  # fmt: skip
        if done.returncode == 0:
            return
        try:
            record = json.loads(result.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            raise TunelabError(f"the config could not be checked: {tail[0]}") from None
    if record.get("problems"):
        raise ConfigError(record["problems"])
    raise TunelabError(record.get("error") or "the config is not valid", record.get("hint"))
