"""The queue with real processes: workers on a lab take jobs, train them as `tunelab train`
does, survive being killed, stop jobs on cancel, and keep going after a job fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tunelab.config import load_config
from tunelab.jobs.api import Lab
from tunelab.rundir import MARKER, complete_checkpoints
from tunelab.train.run import train

from .conftest import cli
from .jobs_helpers import files_under, losses, start_worker, until, write_config


def _states(lab: Lab) -> dict[str, str]:
    return {j.name: j.status for j in lab.jobs()}


@pytest.mark.cpu_only(
    reason="losses of a resumed job equal an unbroken run's to 1e-4: bitwise repeatable on a CPU"
)
def test_killed_worker_three_jobs_all_finish_and_the_resumed_one_matches(
    tiny_model_dir, tmp_path, capsys
):
    """A newcomer's afternoon: save a template, queue three jobs, kill the worker in the middle
    of the first, start a worker again; all three finish, the first resumed from its
    checkpoint with the losses of a run never interrupted."""
    settings = {"max_steps": 16, "save_steps": 4, "val_set_size": 2, "eval_steps": 4,
                "learning_rate": 5e-3}  # fmt: skip
    config = write_config(tmp_path, tiny_model_dir, **settings)
    lab_dir = tmp_path / "lab"
    assert cli(["template", "save", "count", str(config), "--lab", str(lab_dir)], capsys)[0] == 0
    for extra in ([], ["--set", "max_steps=2"], ["--set", "max_steps=3"]):
        assert cli(["submit", "--template", "count", "--lab", str(lab_dir), *extra], capsys)[0] == 0
    lab = Lab(lab_dir)
    first = lab.jobs()[0]
    worker = start_worker(lab_dir)
    until(lambda: (first.run_dir / "checkpoints" / "checkpoint-8" / MARKER).is_file(),
          "the first job's checkpoint at step 8", proc=worker)  # fmt: skip
    worker.kill()  # SIGKILL: the worker can do nothing more; its job is told to stop
    worker.wait()
    until(lambda: json.loads((first.run_dir / "status.json").read_text())["state"]
          == "interrupted", "the orphaned job to save and stop")  # fmt: skip
    assert first.status == "running"  # the store does not know yet: the lease tells
    again = start_worker(lab_dir, "--drain")
    assert again.wait(timeout=600) == 0
    assert set(_states(lab).values()) == {"completed"}, _states(lab)
    assert first.row.attempts == 2
    reasons = [e["reason"] for e in first.info()["events"]]
    assert any("stopped renewing its lease" in r for r in reasons), reasons
    assert "resuming from" in first.logs()
    model, _ = lab.load("count")  # a template's name: its latest completed job
    assert type(model).__name__.startswith("Peft")
    whole = train(load_config(overrides={**settings, **{k: v for k, v in
                  load_config(config).config.model_dump().items() if k in ("base_model",)},
                  "datasets": [{"path": str(tmp_path / "data.json")}], "lora_r": 4,
                  "micro_batch_size": 2, "logging_steps": 1,
                  "output_dir": str(tmp_path / "whole")}), quiet=True)  # fmt: skip
    expected, got = losses(whole.run_dir), losses(first.run_dir)
    assert got.keys() == expected.keys()
    differ = {k: (got[k], expected[k]) for k in expected if abs(got[k] - expected[k]) >= 1e-4}
    assert not differ, differ
    lab.close()


def test_cancel_while_checkpoints_are_written_stops_the_job_with_usable_checkpoints(
    tiny_model_dir, tmp_path, capsys
):
    config = write_config(tmp_path, tiny_model_dir, max_steps=100000, save_steps=1,
                          save_total_limit=3)  # fmt: skip
    lab = Lab(tmp_path / "lab")
    job = lab.apply(config)
    worker = start_worker(lab.paths.root, "--once")
    until(lambda: complete_checkpoints(job.run_dir / "checkpoints"), "a first checkpoint",
          proc=worker)  # fmt: skip
    assert job.cancel() == "running"  # asked; its worker stops it
    assert worker.wait(timeout=300) == 0
    assert job.status == "stopped"
    assert any("cancel" in e["reason"] for e in job.info()["events"])
    kept = complete_checkpoints(job.run_dir / "checkpoints")
    assert kept
    model, tokenizer = lab.load(job, checkpoint=int(kept[-1].name.split("-")[1]))
    assert model is not None and tokenizer is not None
    code, _ = cli(["jobs", "retry", str(job.id), "--lab", str(lab.paths.root)], capsys)
    assert code == 0
    retry = lab.job(int(cli.out.strip()))
    assert retry.row.retry_of == job.id and retry.run_dir == job.run_dir
    lab.close()


def test_a_job_whose_data_vanished_fails_as_train_would_and_the_worker_goes_on(
    tiny_model_dir, tmp_path, capsys
):
    doomed_dir = tmp_path / "doomed"
    doomed_dir.mkdir()
    doomed = write_config(doomed_dir, tiny_model_dir)
    fine = write_config(tmp_path, tiny_model_dir)
    lab = Lab(tmp_path / "lab")
    bad, good = lab.apply(doomed), lab.apply(fine)
    (doomed_dir / "data.json").unlink()
    code, err = cli(["train", str(doomed), "--output", str(tmp_path / "direct")], capsys)
    direct = err.strip().splitlines()[1].strip()  # the line naming the missing file
    worker = start_worker(lab.paths.root, "--drain")
    assert worker.wait(timeout=300) == 0
    assert bad.status == "failed" and good.status == "completed"
    assert code == 2 and str(doomed_dir / "data.json") in direct
    assert direct.lstrip("- ") in bad.row.error
    assert bad.result["status"] == "failed" and bad.result["exit_code"] == 2
    code, _ = cli(["jobs", "list", "--lab", str(lab.paths.root)], capsys)
    assert "failed" in cli.out and "error:" in cli.out
    lab.close()


SECRETS = {"hf_token": "hf_notarealtoken12345", "wandb_api_key": "wandbsecret0987654321"}


def test_a_runpod_request_is_one_job_whose_credentials_reach_only_its_process(
    tiny_model_dir, tmp_path, capsys
):
    (tmp_path / "data.json").write_text(json.dumps([
        {"instruction": "Say hi.", "input": "", "output": "Hi!"}] * 8))  # fmt: skip
    request = {"input": {
        "user_id": "user-7", "model_id": "greeter", "run_id": "req-001",
        "credentials": SECRETS,
        "args": {"base_model": str(tiny_model_dir), "adapter": "lora", "lora_r": 4,
                 "datasets": [{"path": str(tmp_path / "data.json"), "type": "alpaca"}],
                 "max_steps": 3, "micro_batch_size": 2, "sequence_len": 128,
                 "output_dir": "./outputs/out"},
    }}  # fmt: skip
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    lab_dir = tmp_path / "lab"
    answers = []
    for _ in range(2):  # the same request twice is one job
        code, err = cli(["submit", str(path), "--lab", str(lab_dir), "--json"], capsys)
        assert code == 0
        answers.append(cli.out + err)
    lab = Lab(lab_dir)
    assert len(lab.jobs()) == 1 and "queued before" in answers[1]
    job = lab.jobs()[0]
    assert job.name == "req-001" and job.run_dir == lab_dir / "runs" / "req-001"
    assert job.row.owner == "user-7" and job.row.model_id == "greeter"
    worker = start_worker(lab_dir, "--once")
    pid = until(lambda: job.row.pid, "the job's process", proc=worker)
    environ = until(lambda: _environ(pid), "the process's environment")
    assert f"HF_TOKEN={SECRETS['hf_token']}" in environ
    assert f"WANDB_API_KEY={SECRETS['wandb_api_key']}" in environ
    assert worker.wait(timeout=300) == 0
    result = job.result
    assert result["status"] == "completed" and result["exit_code"] == 0
    assert result["adapter"] == str(job.run_dir) and result["model_id"] == "greeter"
    assert result["losses"]["final_loss"] > 0
    for command in (["jobs", "show", "req-001", "--json"], ["jobs", "list", "--json"]):
        cli([*command, "--lab", str(lab_dir)], capsys)
        answers.append(cli.out)
    seen = answers + [p.read_bytes().decode("latin-1") for p in files_under(lab_dir)]
    for secret in SECRETS.values():
        assert not any(secret in text for text in seen), secret
    lab.close()


def _environ(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read().decode(errors="replace").replace("\0", "\n")
    except OSError:
        return None
    return data if "TUNELAB_JOB" in data else None


def test_a_job_whose_worker_died_too_often_fails_with_the_reason(tiny_model_dir, tmp_path):
    lab = Lab(tmp_path / "lab")
    job = lab.apply(write_config(tmp_path, tiny_model_dir), max_attempts=1)
    lab.store.claim("ghost", "elsewhere", "cpu", lease=-1)  # a worker that vanished at once
    worker = start_worker(lab.paths.root, "--drain")
    assert worker.wait(timeout=120) == 0
    assert job.status == "failed"
    assert job.row.error == "its worker died while running it, 1 times"
    assert "jobs retry" in job.row.hint
    lab.close()


def test_the_worker_and_the_listings_never_import_torch(tmp_path):
    lab = str(tmp_path / "lab")
    for command in (["worker", "--drain"], ["jobs", "list"], ["template", "list"]):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "tunelab", *command,
                               "--lab", lab], capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
        assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers")}


def test_the_python_api_runs_a_job_and_loads_its_model(tiny_model_dir, tmp_path):
    with Lab(tmp_path / "lab") as lab:
        job = lab.apply(write_config(tmp_path, tiny_model_dir, save_steps=1, max_steps=2),
                        wait=True)  # fmt: skip
        assert job.status == "completed" and len(job.metrics()) >= 2
        rows = lab.show("checkpoints", of=job)
        assert [r["step"] for r in rows] == [1, 2] and rows[-1]["last"]
        model, tokenizer = lab.load(job, checkpoint="last")
        assert type(model).__name__.startswith("Peft")
        merged, _ = lab.load(job.name, merge=True)
        assert not type(merged).__name__.startswith("Peft")
        assert [t["name"] for t in lab.show("jobs")] == [job.name]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_drain_twenty_jobs_each_run_once(backend, tiny_model_dir, tmp_path, capsys,
                                                     request):  # fmt: skip
    env = {}
    if backend == "postgresql":
        env["TUNELAB_DB"] = request.getfixturevalue("postgres").new_database()
    os.environ.update(env)
    try:
        config = write_config(tmp_path, tiny_model_dir, max_steps=1, val_set_size=2,
                              eval_steps=1)  # fmt: skip
        lab_dir = tmp_path / "lab"
        code, err = cli(["submit", str(config), "--lab", str(lab_dir), "--sweep",
                         "learning_rate=1e-3,2e-3", "--sweep", "lora_r=2,4",
                         "--sweep", "seed=1,2,3,4,5"], capsys)  # fmt: skip
        assert code == 0 and len(cli.out.split()) == 20
        group = err.split("as group ")[1].split()[0]
        workers = [start_worker(lab_dir, "--drain", env=env) for _ in range(2)]
        assert [w.wait(timeout=900) for w in workers] == [0, 0]
        lab = Lab(lab_dir)
        jobs = lab.jobs()
        assert len(jobs) == 20 and {j.status for j in jobs} == {"completed"}
        for job in jobs:
            taken = [e for e in job.info()["events"] if e["state"] == "running"
                     and e["from"] == "queued"]  # fmt: skip
            assert len(taken) == 1 and job.logs().count("=== attempt") == 1
        assert len({j.row.worker for j in jobs}) == 2  # both took a share
        code, _ = cli(["jobs", "compare", group, "--lab", str(lab_dir), "--json"], capsys)
        table = json.loads(cli.out)
        assert len(table) == 20 and set(table[0]["settings"]) == {"learning_rate", "lora_r", "seed"}
        assert [t["best_eval_loss"] for t in table] == sorted(t["best_eval_loss"] for t in table)
        lab.close()
    finally:
        for key in env:
            os.environ.pop(key)


def test_a_stalled_workers_job_is_stopped_before_another_worker_takes_it(tiny_model_dir, tmp_path):
    """Worker A stops answering (SIGSTOP) while its job trains on. Worker B, on the same
    machine, sees the lease expire, stops A's job process first, then runs the job itself
    from its checkpoint; A, woken up, finds the job is no longer its own."""
    lab = Lab(tmp_path / "lab")
    job = lab.apply(write_config(tmp_path, tiny_model_dir, max_steps=100000, save_steps=2))
    a = start_worker(lab.paths.root)
    first = until(lambda: job.row.pid if complete_checkpoints(job.run_dir / "checkpoints")
                  else None, "a checkpoint of the first attempt", proc=a)  # fmt: skip
    os.kill(a.pid, signal.SIGSTOP)
    b = start_worker(lab.paths.root)
    try:
        until(lambda: job.row.attempts == 2 and job.row.pid not in (None, first),
              "worker B to run the job", proc=b)  # fmt: skip
        assert (
            not os.path.exists(f"/proc/{first}")
            or open(f"/proc/{first}/stat").read().split(")")[1].split()[0] == "Z"
        )  # the first process ended before the second started
        reasons = [e["reason"] for e in job.info()["events"]]
        assert any("stopped renewing its lease" in r for r in reasons)
        until(lambda: "resuming from" in job.logs(), "the second attempt to resume", proc=b)
        os.kill(a.pid, signal.SIGCONT)
        until(lambda: "no longer this worker's" in (lab.paths.root / "worker-0.out").read_text(),
              "worker A to give the job up", proc=a)  # fmt: skip
        assert job.status == "running" and job.row.worker.endswith(f":{b.pid}")
        job.cancel()
        assert job.wait(timeout=120) == "stopped"
    finally:
        for w in (a, b):
            os.kill(w.pid, signal.SIGCONT)
            w.terminate()
            w.wait(timeout=120)
    lab.close()


def test_submit_wait_follows_the_job_to_its_end(tiny_model_dir, tmp_path):
    lab_dir = tmp_path / "lab"
    worker = start_worker(lab_dir)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tunelab", "submit", str(write_config(tmp_path, tiny_model_dir)),
             "--lab", str(lab_dir), "--wait"], capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        worker.terminate()
        assert worker.wait(timeout=120) == 0
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"job 1 completed: {lab_dir / 'runs' / 'cfg-1'}"
    assert "job 1: step 2/2, loss " in done.stderr


def test_a_job_cancelled_while_its_worker_died_ends_stopped(tiny_model_dir, tmp_path):
    lab = Lab(tmp_path / "lab")
    job = lab.apply(write_config(tmp_path, tiny_model_dir))
    lab.store.claim("ghost", "elsewhere", "cpu", lease=30)
    assert job.cancel() == "running"  # asked; but its worker is gone
    lab.store.renew(job.id, "ghost", lease=-1)
    worker = start_worker(lab.paths.root, "--drain")
    assert worker.wait(timeout=120) == 0
    assert job.status == "stopped" and job.row.attempts == 1  # never run again
    lab.close()


def test_retry_refuses_while_another_job_continues_the_run(tiny_model_dir, tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.jobs.submit import retry

    lab = Lab(tmp_path / "lab")
    job = lab.apply(write_config(tmp_path, tiny_model_dir))
    assert job.cancel() == "stopped"
    first = retry(lab.store, job.row)
    assert first.run_dir == str(job.run_dir) and first.retry_of == job.id
    with pytest.raises(TunelabError, match="already continues"):
        retry(lab.store, job.row)
    lab.close()
