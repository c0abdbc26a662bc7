"""Checkpoints and resume: a killed run continues exactly where its last checkpoint was."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tunelab.config import load_config
from tunelab.errors import RunDirError
from tunelab.rundir import MARKER, complete_checkpoints
from tunelab.train.run import train

from .conftest import write_json

ROWS = [
    {"instruction": f"Count to {i}.", "output": " ".join(str(k) for k in range(i))}
    for i in range(1, 13)
]


def settings(model_dir, data, out, **more):
    return {
        "base_model": str(model_dir), "datasets": [{"path": str(data)}], "output_dir": str(out),
        "val_set_size": 2, "eval_steps": 4, "max_steps": 16, "save_steps": 4, "micro_batch_size": 2,
        "learning_rate": 5e-3, "logging_steps": 1, "lora_r": 4, **more,
    }  # fmt: skip


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {
        (r["step"], "eval" if "eval_loss" in r else "train"): r.get("loss", r.get("eval_loss"))
        for r in map(json.loads, lines)
    }


def cli(*args):
    return [sys.executable, "-m", "tunelab.cli", "train", *args]


def args_for(model_dir, data, out):
    base = ["--data", str(data), "--base-model", str(model_dir), "--output", str(out)]
    for key, value in settings(model_dir, data, out).items():
        if key not in ("base_model", "datasets", "output_dir"):
            base += ["--set", f"{key}={value}"]
    return base


def _kill_after_step_8(command, out):
    """Run ``command`` and SIGKILL it once its checkpoint at step 8 is complete."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "checkpoint-8" / MARKER).is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before step 8"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_checkpoints_are_marked_with_last_and_best(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "d.json", ROWS)
    result = train(
        load_config(overrides=settings(tiny_model_dir, data, tmp_path / "run")), quiet=True
    )
    folder = result.run_dir / "checkpoints"
    assert [p.name for p in complete_checkpoints(folder)] == [
        f"checkpoint-{s}" for s in (4, 8, 12, 16)
    ]
    last = json.loads((folder / "last" / "checkpoint.json").read_text())
    best = json.loads((folder / "best" / "checkpoint.json").read_text())
    assert last["step"] == 16 and (folder / "last" / "adapter_model.safetensors").is_file()
    evals = {step: loss for (step, kind), loss in losses(result.run_dir).items() if kind == "eval"}
    assert best["eval_loss"] == min(evals.values()) and best["step"] == min(evals, key=evals.get)


@pytest.mark.cpu_only(
    reason="losses of a resumed run equal an unbroken run's to 1e-4: bitwise repeatable on a CPU"
)
def test_killed_run_resumes_to_the_same_losses(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "d.json", ROWS)
    whole = train(
        load_config(overrides=settings(tiny_model_dir, data, tmp_path / "whole")), quiet=True
    )
    out = tmp_path / "killed"
    _kill_after_step_8(cli(*args_for(tiny_model_dir, data, out), "--set", "max_steps=16"), out)
    assert json.loads((out / "status.json").read_text())["state"] == "running"  # it never knew
    done = subprocess.run(
        cli(*args_for(tiny_model_dir, data, out), "--resume"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout
    expected, got = losses(whole.run_dir), losses(out)
    assert got.keys() == expected.keys()
    assert all(abs(got[k] - expected[k]) < 1e-4 for k in expected), (got, expected)


def test_sigterm_saves_a_checkpoint_and_stops(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "d.json", ROWS)
    out = tmp_path / "run"
    args = args_for(tiny_model_dir, data, out) + [
        "--set",
        "max_steps=100000",
        "--set",
        "save_steps=100000",
    ]
    proc = subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "--resume" in err
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted"
    assert complete_checkpoints(out / "checkpoints")


def test_resume_refuses_changed_data_or_rank(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "d.json", ROWS)
    out = tmp_path / "run"
    first = settings(tiny_model_dir, data, out, max_steps=4)
    train(load_config(overrides=first), quiet=True)
    # mark it unfinished, as a crash would leave it
    status = json.loads((out / "status.json").read_text())
    (out / "status.json").write_text(json.dumps({**status, "state": "failed"}))
    with pytest.raises(RunDirError, match="lora_r was 4, now 8"):
        train(load_config(overrides={**first, "lora_r": 8}), quiet=True, resume=True)
    write_json(data, ROWS[:-1])
    with pytest.raises(RunDirError, match=f"data file {data} has changed"):
        train(load_config(overrides=first), quiet=True, resume=True)


def test_resume_of_a_finished_run_is_refused(tiny_model_dir, tmp_path, alpaca_file):
    out = tmp_path / "run"
    overrides = settings(tiny_model_dir, alpaca_file, out, max_steps=2, val_set_size=0)
    train(load_config(overrides=overrides), quiet=True)
    with pytest.raises(RunDirError, match="this run has finished"):
        train(load_config(overrides=overrides), quiet=True, resume=True)


def _mark_unfinished(out, state="failed"):
    status = json.loads((out / "status.json").read_text())
    (out / "status.json").write_text(json.dumps({**status, "state": state}))


def test_resume_refuses_a_changed_schedule(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "d.json", ROWS)
    out = tmp_path / "run"
    first = settings(tiny_model_dir, data, out, max_steps=4)
    train(load_config(overrides=first), quiet=True)
    _mark_unfinished(out)
    saved = (out / "config.yaml").read_text()
    for change, message in (({"learning_rate": 1e-3}, "learning_rate was 0.005, now 0.001"),
                            ({"max_steps": 8}, "max_steps was 4, now 8")):  # fmt: skip
        with pytest.raises(RunDirError, match=message):
            train(load_config(overrides={**first, **change}), quiet=True, resume=True)
    assert (out / "config.yaml").read_text() == saved  # nothing recorded that did not happen


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_resume_from_the_last_checkpoint_trains_no_extra_step(adapter, tiny_model_dir, tmp_path):
    """Killed while saving the finished run: resuming finishes it at max_steps exactly, even
    when max_steps falls inside an epoch, and never promotes what the kill left half-written."""
    from safetensors.torch import load_file

    data = write_json(tmp_path / "d.json", ROWS)
    out = tmp_path / "run"
    # 12 rows in batches of 2, 2 held out: 5 steps per epoch; step 7 is inside the second
    overrides = settings(tiny_model_dir, data, out, max_steps=7, save_steps=7, eval_steps=7,
                         adapter=adapter, learning_rate=1e-4)  # fmt: skip
    train(load_config(overrides=overrides), quiet=True)
    weights = "adapter_model.safetensors" if adapter == "lora" else "model.safetensors"
    at_end = load_file(out / "checkpoints" / "checkpoint-7" / weights)
    (out / weights).unlink()
    (out / "adapter_info.json").unlink()
    _mark_unfinished(out, "running")
    junk = out / ".tunelab-tmp-weights-x1y2"
    junk.mkdir()
    (junk / ".tmp123").write_bytes(b"half a file")
    (out / ".weights-staging").mkdir()
    (out / ".weights-staging" / ".tmp456").write_bytes(b"older half")
    result = train(load_config(overrides=overrides), quiet=True, resume=True)
    assert result.steps == 7
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 7
    assert max(step for step, _ in losses(out)) == 7
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert not list(out.rglob(".tmp*"))
    final = load_file(out / weights)
    assert final.keys() == at_end.keys()
    assert all(torch.equal(final[k], at_end[k]) for k in final)


def test_a_second_writer_is_refused_with_the_holders_pid(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "d.json", ROWS)
    out = tmp_path / "run"
    first = subprocess.Popen(  # trains until stopped: no step limit and no automatic stop
        cli(*args_for(tiny_model_dir, data, out), "--set", "max_steps=100000", "--force-epochs"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file():
            assert first.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.05)
        for extra in (["--resume"], ["--overwrite"]):
            second = subprocess.run(cli(*args_for(tiny_model_dir, data, out), *extra),
                                    capture_output=True, text=True, timeout=300)  # fmt: skip
            assert second.returncode == 2, second.stderr
            assert f"being written by process {first.pid}" in second.stderr
        assert json.loads((out / "status.json").read_text())["state"] == "running"
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert json.loads((out / "status.json").read_text())["state"] == "interrupted"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the lock is gone


def test_resuming_from_an_earlier_checkpoint_forgets_what_came_after(tiny_model_dir, tmp_path):
    from tunelab.rundir import RunLayout
    from tunelab.train.resume import forget_after

    data = write_json(tmp_path / "d.json", ROWS)
    train(load_config(overrides=settings(tiny_model_dir, data, tmp_path / "run")), quiet=True)
    layout = RunLayout(tmp_path / "run")
    marks = {
        p.name: json.loads((p / MARKER).read_text())
        for p in complete_checkpoints(layout.checkpoints)
    }
    assert sorted(marks) == ["checkpoint-12", "checkpoint-16", "checkpoint-4", "checkpoint-8"]
    removed = forget_after(layout, 8)
    best_later = min(marks.values(), key=lambda m: m["eval_loss"])["step"] > 8
    assert sorted(removed) == sorted(
        ["checkpoint-12", "checkpoint-16", "last"] + ["best"] * best_later
    )
    assert [p.name for p in complete_checkpoints(layout.checkpoints)] == [
        "checkpoint-4",
        "checkpoint-8",
    ]
    best = json.loads((layout.checkpoints / "best" / "checkpoint.json").read_text())
    earlier = [marks["checkpoint-4"], marks["checkpoint-8"]]
    assert best == min(earlier, key=lambda m: m["eval_loss"])  # the best of what is left
    assert not (layout.checkpoints / "last").exists()  # the resumed run writes it again


@pytest.mark.cpu_only(
    reason="losses of a resumed run equal an unbroken run's to 1e-4: bitwise repeatable on a CPU"
)
def test_a_run_resumed_at_an_epoch_boundary_matches_an_unbroken_one(tiny_model_dir, tmp_path):
    """Every checkpoint here ends an epoch (two training rows, batch 2). transformers loads
    the checkpoint's RNG state after the next epoch began; the state saved must be the one
    that epoch's seed gives, or dropout and batch order drift after the resume."""
    from .conftest import MEMORISE

    data = write_json(tmp_path / "d.json", MEMORISE * 3)  # 4 distinct rows: 2 train, 2 held out
    whole = train(
        load_config(overrides=settings(tiny_model_dir, data, tmp_path / "whole")), quiet=True
    )
    assert whole.steps == 16
    out = tmp_path / "killed"
    _kill_after_step_8(cli(*args_for(tiny_model_dir, data, out)), out)
    done = subprocess.run(cli(*args_for(tiny_model_dir, data, out), "--resume"),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected, got = losses(whole.run_dir), losses(out)
    assert got.keys() == expected.keys()
    differ = {k: (got[k], expected[k]) for k in expected if abs(got[k] - expected[k]) >= 1e-4}
    assert not differ, differ
