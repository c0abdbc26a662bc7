"""Helpers for the job tests: configs for the tiny model, a worker in its own process, and
waiting on what the store and the run directory say (polling with a deadline, never a
fixed sleep)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from .conftest import MEMORISE, write_json

FAST_WORKER = ["--heartbeat", "0.5", "--lease", "3", "--poll", "0.2", "--grace", "30"]


def write_config(folder: Path, model_dir: Path, name: str = "cfg.yaml", **settings) -> Path:
    data = folder / "data.json"
    if not data.exists():
        write_json(data, MEMORISE * 3)
    config = {"base_model": str(model_dir), "datasets": [{"path": str(data)}], "lora_r": 4,
              "micro_batch_size": 2, "logging_steps": 1, "val_set_size": 0, "max_steps": 2,
              **settings}  # fmt: skip
    path = folder / name
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def start_worker(lab: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``tunelab worker`` on ``lab`` in a process of its own (its console in lab/worker-N.out)."""
    n = len(list(lab.glob("worker-*.out"))) if lab.exists() else 0
    lab.mkdir(parents=True, exist_ok=True)
    out = open(lab / f"worker-{n}.out", "w")  # noqa: SIM115 - the process keeps it
    return subprocess.Popen(
        [sys.executable, "-m", "tunelab", "worker", "--lab", str(lab), *FAST_WORKER, *args],
        stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
    )  # fmt: skip


def until(check: Callable[[], object], what: str, timeout: float = 240.0, proc=None):
    """Poll ``check`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the worker exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def losses(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {
        (r["step"], "eval" if "eval_loss" in r else "train"): r.get("loss", r.get("eval_loss"))
        for r in map(json.loads, lines)
    }


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]
