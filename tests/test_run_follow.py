"""A run followed from another process through its directory alone, as a queue or a page will."""

from __future__ import annotations

import subprocess
import sys
import time

from tunelab.rundir.metrics import follow_metrics
from tunelab.rundir.status import read_status

from .conftest import MEMORISE, write_json

STEPS = 60
EVAL_STEPS = 10


def test_follow_a_training_run_by_its_status_and_metrics(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "d.json", MEMORISE * 3)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "tunelab.cli", "train", "--data", str(data), "--base-model",
            str(tiny_model_dir), "--output", str(out), "--set", f"max_steps={STEPS}",
            "--set", "logging_steps=1", "--set", "val_set_size=3", "--set", f"eval_steps={EVAL_STEPS}",
            "--set", "lora_r=4", "--set", "bf16=false"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen_running: list[int] = []  # steps read from status.json while the run was running
    arrivals: list[int] = []  # how many new metric records each read brought, while running
    records: list[dict] = []
    at = 0  # the position in metrics.jsonl read up to
    deadline = time.monotonic() + 240
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the run took too long"
        if (out / "status.json").is_file():
            status = read_status(out / "status.json")
            if status.state == "running":
                seen_running.append(status.step)
                assert status.pid == proc.pid and status.total_steps == STEPS
                new, at = follow_metrics(out / "metrics.jsonl", at)
                if new:
                    arrivals.append(len(new))
                    records += new
        time.sleep(0.01)
    assert proc.returncode == 0, proc.stderr.read()
    final = read_status(out / "status.json")
    assert final.state == "completed" and final.step == STEPS and final.last_loss is not None
    records += follow_metrics(out / "metrics.jsonl", at)[0]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # every logged step once, in order
    # and every evaluation once, though each shares its step with a training loss
    evaluated = [r["step"] for r in records if "eval_loss" in r]
    assert evaluated == list(range(EVAL_STEPS, STEPS + 1, EVAL_STEPS))
    # it was followed while it trained: progress and losses arrived in several reads
    assert any(0 < s < STEPS for s in seen_running)
    assert len(arrivals) >= 2


def test_the_run_is_preparing_while_its_model_loads(tiny_model_dir, alpaca_file, tmp_path,
                                                    monkeypatch):  # fmt: skip
    """The run directory exists, in state preparing, before the model loads: what another
    process reads there while the weights load (seen from inside the load, so never late)."""
    import os

    import tunelab.train.run as train_run

    from .conftest import run

    out = tmp_path / "run"
    seen = []
    real = train_run.load_model

    def load_model(*args, **kwargs):
        seen.append(read_status(out / "status.json"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_run, "load_model", load_model)
    run(tiny_model_dir, alpaca_file, out, max_steps=2)
    [during] = seen
    assert during.state == "preparing" and during.doing == "loading the model"
    assert during.pid == os.getpid() and during.total_steps == 2 and during.step == 0
    assert (out / "config.yaml").is_file() and (out / "train.log").is_file()
    final = read_status(out / "status.json")
    assert final.state == "completed" and final.doing is None
    assert final.started == during.started


def test_a_model_that_fails_to_load_leaves_a_failed_run(tiny_model_dir, alpaca_file, tmp_path,
                                                        capsys):  # fmt: skip
    """Damaged weights are found once the run directory exists: the run records the failure
    (message and way out), stays for the user to read, and is replaced only on request."""
    import shutil

    from .conftest import cli

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "run"
    args = ["train", "--data", str(alpaca_file), "--base-model", str(model), "--output", str(out)]
    code, err = cli(args, capsys)
    assert code != 0
    status = read_status(out / "status.json")
    assert status.state == "failed" and status.doing is None and status.finished is not None
    assert "cannot load the model" in status.error and status.error in err
    assert "run again with --overwrite" in status.hint and status.hint in err
    assert "Traceback" in (out / "train.log").read_text()  # the details, for a crash
    code, err = cli(args, capsys)  # a failed run is not replaced unasked
    assert code == 2 and "already holds files of another run" in err and "--overwrite" in err
    assert read_status(out / "status.json").finished == status.finished
