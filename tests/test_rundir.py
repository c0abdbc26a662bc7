"""The run directory as a contract: torch-free, a typed status, metrics with a cursor, and
runs written by the previous layout still readable."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunelab.errors import RunDirError, TrainingFailed
from tunelab.files import exclusive
from tunelab.rundir import (
    MARKER,
    STATUS_VERSION,
    RunLayout,
    RunStatus,
    StatusFile,
    append_metrics,
    checkpoint_index,
    follow_metrics,
    list_runs,
    read_metrics,
    read_status,
    write_status,
)

from .conftest import MEMORISE, cli, run, write_json

# What tunelab wrote to status.json before the typed record: no version, pid, host or
# current step; the steps done only at the end, as "steps".
OLD_STATUS = {
    "state": "completed",
    "started": "2025-01-02T03:04:05+00:00",
    "total_steps": 3,
    "fingerprint": {"base_model": "tiny", "data": {"d.json": "abc"}},
    "finished": "2025-01-02T03:05:00+00:00",
    "steps": 3,
}


def test_listing_runs_loads_neither_torch_nor_transformers(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "status.json").write_text(json.dumps(OLD_STATUS))
    code = (
        "import sys, tunelab.rundir\n"
        "from tunelab.cli import main\n"
        f"assert main(['runs', {str(tmp_path)!r}]) == 0\n"
        "heavy = ('torch', 'transformers', 'peft', 'trl', 'datasets')\n"
        "print('loaded:', sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "old" in done.stdout and "completed" in done.stdout
    assert done.stdout.strip().endswith("loaded: []")


def test_status_round_trip(tmp_path):
    path = tmp_path / "status.json"
    status = RunStatus.begin("running", total_steps=10, fingerprint={"seed": 1})
    assert status.pid == os.getpid() and status.host == socket.gethostname()
    assert status.version == STATUS_VERSION and status.started == status.updated
    write_status(path, status)
    assert read_status(path) == status
    raw = json.loads(path.read_text())
    assert raw["state"] == "running" and raw["total_steps"] == 10 and raw["error"] is None
    later = status.changed(step=4, epoch=0.4, last_loss=1.25)
    write_status(path, later)
    back = read_status(path)
    assert (back.step, back.epoch, back.last_loss, back.total_steps) == (4, 0.4, 1.25, 10)
    with pytest.raises(ValueError):
        status.changed(state="paused")
    with pytest.raises(ValueError, match="no field last_los"):
        status.changed(last_los=1.0)  # misspelt: refused when writing, never dropped
    with pytest.raises(ValueError, match="no field totl_steps"):
        RunStatus.begin("running", totl_steps=3)
    (tmp_path / "newer.json").write_text(json.dumps({"state": "running", "later_key": 1}))
    assert read_status(tmp_path / "newer.json").state == "running"  # reading stays tolerant
    (tmp_path / "newer.json").unlink()
    assert not [p for p in tmp_path.iterdir() if p.name != "status.json"]  # written atomically


def test_status_file_writes_every_change(tmp_path):
    file = StatusFile(tmp_path / "status.json", RunStatus.begin("preparing", doing="reading data"))
    assert read_status(file.path).doing == "reading data"
    file.update(state="running", doing=None, total_steps=5)
    file.update(step=2, last_loss=2.5)
    file.end("completed", step=5)
    status = read_status(file.path)
    assert status.state == "completed" and status.ended and status.step == 5
    assert status.finished is not None and status.doing is None and status.last_loss == 2.5


def test_an_old_layout_status_reads_and_lists(tmp_path):
    root = tmp_path / "runs" / "old"
    root.mkdir(parents=True)
    (root / "status.json").write_text(json.dumps(OLD_STATUS))
    status = read_status(root / "status.json")
    assert status.version == 0 and status.state == "completed" and status.step == 3
    assert status.pid is None and status.error is None
    assert status.fingerprint == OLD_STATUS["fingerprint"]
    [listed] = list_runs(tmp_path / "runs")
    assert listed["run"] == str(root) and listed["state"] == "completed"
    assert listed["steps"] == 3 and listed["date"] == "2025-01-02T03:05"
    assert listed["older_layout"] is True and listed["resumable"].startswith("no: finished")


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"state": "sleeping"}', "state: Input should be 'preparing', 'running'"),
        ('{"started": "today"}', "state: Field required"),
        (b'{"state": "running", "doing": "\xff"}', "not UTF-8"),
    ],
)
def test_a_file_that_is_no_status_record_is_named(tmp_path, text, problem, capsys):
    root = tmp_path / "odd"
    root.mkdir()
    if isinstance(text, bytes):
        (root / "status.json").write_bytes(text)
    else:
        (root / "status.json").write_text(text)
    with pytest.raises(RunDirError) as caught:
        read_status(root / "status.json")
    assert str(root / "status.json") in caught.value.message
    assert "not a tunelab status record" in caught.value.message and problem in caught.value.message
    code, _ = cli(["runs", str(tmp_path), "--json"], capsys)
    [listed] = json.loads(cli.out)
    assert code == 0 and listed["state"] == "unreadable" and problem in listed["problem"]
    code, _ = cli(["runs", str(tmp_path)], capsys)
    assert code == 0 and "unreadable" in cli.out and f"problem: {listed['problem']}" in cli.out


def test_metrics_cursor(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == [] and follow_metrics(path) == ([], 0)
    for step in (1, 2, 3):
        append_metrics(path, {"step": step, "epoch": step / 3, "loss": 3.0 - step})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    records, at = follow_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3] and at == path.stat().st_size
    # the trainer logs the training loss and the evaluation of a step as two records: a
    # reader between them still gets the second
    append_metrics(path, {"step": 3, "epoch": 1.0, "eval_loss": 0.5})
    assert follow_metrics(path, at) == ([{"step": 3, "epoch": 1.0, "eval_loss": 0.5}],
                                        path.stat().st_size)  # fmt: skip
    at = path.stat().st_size
    assert follow_metrics(path, at) == ([], at)
    with path.open("a") as f:  # a writer part way through its next line
        f.write('{"step": 4, "epo')
    assert follow_metrics(path, at) == ([], at)
    with path.open("a") as f:
        f.write('ch": 1.33, "loss": 0.1}\n')
    assert follow_metrics(path, at) == ([{"step": 4, "epoch": 1.33, "loss": 0.1}],
                                        path.stat().st_size)  # fmt: skip
    path.write_text('{"step": 1, "loss": 2.0}\n')  # rewritten shorter (a resume): from the start
    assert follow_metrics(path, at) == ([{"step": 1, "loss": 2.0}], path.stat().st_size)


def test_checkpoint_index(tmp_path):
    folder = RunLayout(tmp_path).checkpoints
    assert checkpoint_index(folder).latest is None
    for step, complete in ((10, True), (2, True), (12, False)):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (folder / f"checkpoint-{step}" / MARKER).write_text(json.dumps({"step": step}))
    (folder / "last").mkdir()
    (folder / "last" / "checkpoint.json").write_text(json.dumps({"step": 10}))
    index = checkpoint_index(folder)
    assert [p.name for p in index.complete] == ["checkpoint-2", "checkpoint-10"]
    assert [p.name for p in index.incomplete] == ["checkpoint-12"]
    assert index.latest == folder / "checkpoint-10" and index.last == folder / "last"
    assert index.best is None


def test_a_finished_run_records_its_progress(trained):
    status = read_status(RunLayout(trained.run_dir).status)
    assert status.state == "completed" and status.version == STATUS_VERSION
    assert status.step == status.total_steps == trained.steps
    assert status.pid == os.getpid() and status.host == socket.gethostname()
    assert status.started <= status.updated and status.finished is not None
    assert status.epoch and status.last_loss is not None and status.error is None
    last_loss = [r["loss"] for r in read_metrics(RunLayout(trained.run_dir).metrics) if "loss" in r]
    assert status.last_loss == last_loss[-1]


def test_a_failed_run_records_its_message_and_hint_apart(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingFailed) as caught:
        run(
            tiny_model_dir, alpaca_file, out, max_steps=30, learning_rate=1e38, warmup_steps=0,
            optimizer="sgd", max_grad_norm=0,
        )  # fmt: skip
    status = read_status(out / "status.json")
    assert status.state == "failed" and status.finished is not None
    assert status.error == caught.value.message and status.error.startswith("training failed: nan")
    assert status.hint == caught.value.hint and "lower learning_rate" in status.hint
    assert status.stop_reason is not None and status.stop_reason in status.error
    assert 0 < status.step < 30 and status.total_steps == 30
    [listed] = list_runs(out)
    assert listed["state"] == "failed" and listed["problem"] == status.error


def test_the_run_list_reads_a_live_run_as_not_resumable(tmp_path):
    root = tmp_path / "live"
    with exclusive(root):  # as tunelab train holds it
        StatusFile(RunLayout(root).status, RunStatus.begin("running", total_steps=8))
        [listed] = list_runs(tmp_path)
    assert listed["state"] == "running" and listed["resumable"].startswith("no: running (pid")
    assert Path(listed["run"]) == root and listed["older_layout"] is False


def test_a_run_whose_process_is_gone_is_stale_and_resumable(tmp_path):
    root = tmp_path / "killed"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    StatusFile(RunLayout(root).status, RunStatus.begin("running", total_steps=8, step=4))
    status = read_status(RunLayout(root).status)
    write_status(RunLayout(root).status, status.model_copy(update={"pid": gone.pid}))
    [listed] = list_runs(tmp_path)
    assert listed["state"] == "stale" and "is gone" in listed["problem"]
    assert listed["resumable"] == "no: no complete checkpoint"
    checkpoint = RunLayout(root).checkpoints / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / MARKER).write_text(json.dumps({"step": 4}))
    [listed] = list_runs(tmp_path)
    assert listed["state"] == "stale" and listed["resumable"] == "yes"
    # a live pid (this process) that does not hold the run's lock: the pid was reused
    write_status(RunLayout(root).status, status)
    [listed] = list_runs(tmp_path)
    assert listed["state"] == "stale" and listed["resumable"] == "yes"
    with exclusive(root):
        [listed] = list_runs(tmp_path)
    assert listed["state"] == "running" and listed["resumable"].startswith("no: running")


def test_a_run_stopped_by_a_signal_records_why_and_where(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "d.json", MEMORISE * 3)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "tunelab.cli", "train", "--data", str(data), "--base-model",
            str(tiny_model_dir), "--output", str(out), "--set", "max_steps=400",
            "--set", "logging_steps=7", "--set", "val_set_size=0", "--set", "lora_r=4"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the run took too long"
        status_path = out / "status.json"
        if status_path.is_file() and read_status(status_path).step >= 7:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    assert proc.wait(timeout=240) == 130, proc.stderr.read()
    status = read_status(out / "status.json")
    assert status.state == "interrupted" and status.stop_reason == "signal SIGTERM"
    [checkpoint] = [p for p in (out / "checkpoints").glob("checkpoint-*")]
    saved = json.loads((checkpoint / MARKER).read_text())["step"]
    assert status.step == saved  # where it stopped, not where it last logged


def test_a_failing_status_write_never_stops_training_nor_hides_its_error(
    tiny_model_dir, alpaca_file, tmp_path, monkeypatch
):
    import tunelab.rundir.status as status_module

    real = status_module.write_status

    def progress_fails(path, status):
        if status.state == "running" and status.step > 0:
            raise OSError(28, "No space left on device")
        real(path, status)

    monkeypatch.setattr(status_module, "write_status", progress_fails)
    result = run(tiny_model_dir, alpaca_file, tmp_path / "ok", max_steps=6, logging_steps=1)
    assert result.steps == 6 and read_status(tmp_path / "ok" / "status.json").state == "completed"
    log = (tmp_path / "ok" / "train.log").read_text()
    assert log.count("could not write the progress") == 1 and "No space left" in log

    def end_fails(path, status):
        if status.ended:
            raise OSError(28, "No space left on device")
        real(path, status)

    monkeypatch.setattr(status_module, "write_status", end_fails)
    with pytest.raises(TrainingFailed):  # the real error, not the failed write
        run(
            tiny_model_dir, alpaca_file, tmp_path / "ok", overwrite=True, max_steps=30,
            learning_rate=1e38, warmup_steps=0, optimizer="sgd", max_grad_norm=0,
        )  # fmt: skip
    assert read_status(tmp_path / "ok" / "status.json").state == "completed"  # the old run
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tunelab-tmp-")]
