"""``tunelab worker``: takes queued jobs from the store, one per device, and runs each as
``tunelab train`` in a process of its own; renews its lease on them while they run, stops
them when asked, and requeues the jobs of workers that died. Never imports torch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunelab.errors import RunDirError, TunelabError
from tunelab.jobs import process
from tunelab.jobs.db import JobRow
from tunelab.jobs.lab import LabPaths, unseal, write_job_config
from tunelab.jobs.results import job_result
from tunelab.jobs.store import Store
from tunelab.jobs.tasks import task_command
from tunelab.redact import redact
from tunelab.rundir import RunLayout, complete_checkpoints, read_status

# RunPod's credential names -> the environment variables the libraries read
CREDENTIAL_ENV = {"hf_token": "HF_TOKEN", "wandb_api_key": "WANDB_API_KEY"}


@dataclass
class Settings:
    devices: list[str]
    lease: float = 60.0  # seconds a job stays ours without a renewal
    heartbeat: float = 10.0  # seconds between renewals
    grace: float = 60.0  # seconds between SIGTERM and SIGKILL
    poll: float = 1.0  # seconds between looks at the queue and the processes
    once: bool = False  # take one job, run it, exit
    drain: bool = False  # exit once the queue is empty and nothing runs
    job_id: int | None = None  # take only this job


@dataclass
class Running:
    job: JobRow
    device: str
    popen: subprocess.Popen
    started: str | None
    cancel_sent: float | None = None  # when SIGTERM was sent (SIGKILL follows after grace)
    cancelled: bool = False  # the user asked: the job ends stopped
    shutdown: bool = False  # stopped because the worker stops: requeue, do not end it
    lost: bool = False  # another worker holds the job now: the store is not ours to change


def default_devices() -> str:
    """The GPUs ``nvidia-smi -L`` lists (one job each), else ``cpu``; found without torch."""
    import shutil

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "cpu"
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    return ",".join(str(i) for i in range(len(gpus))) if gpus else "cpu"


def train_command(job: JobRow, config: Path) -> list[str]:
    """``tunelab train`` on the job's config, into its run directory: resumed from its last
    complete checkpoint after an earlier attempt, started over if it left none."""
    args = [
        sys.executable,
        "-m",
        "tunelab",
        "train",
        str(config),
        "--output",
        job.run_dir,
        "--no-tensorboard",
    ]
    layout = RunLayout(Path(job.run_dir))
    if complete_checkpoints(layout.checkpoints):
        args.append("--resume")
    elif layout.status.exists():
        args.append("--overwrite")  # an earlier attempt died before its first checkpoint
    return args


class Worker:
    def __init__(
        self,
        paths: LabPaths,
        store: Store,
        settings: Settings,
        say: Callable[[str], None] = print,
    ) -> None:
        self.paths, self.store, self.settings = paths, store, settings
        self.host = socket.gethostname()
        self.name = f"{self.host}:{os.getpid()}"
        self.running: dict[int, Running] = {}
        self.orphans: dict[int, float] = {}  # job id -> when its orphaned process gets SIGKILL
        self.taken = 0
        self.stopping = False
        self._say = say

    def say(self, line: str) -> None:
        self._say(f"{datetime.now(UTC):%H:%M:%S} {line}")

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> int:
        def on_signal(signum, frame):
            if self.stopping:  # a second signal: stop the jobs now
                for r in self.running.values():
                    process.signal_group(r.popen.pid, signal.SIGKILL)
            self.stopping = True

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.say(f"worker {self.name} on {', '.join(self.settings.devices)}: lab {self.paths.root}")
        last_beat = 0.0
        try:
            while True:
                try:
                    self.reap()
                    if time.monotonic() - last_beat >= self.settings.heartbeat:
                        self.beat()
                        self.requeue_expired()
                        last_beat = time.monotonic()
                    if self.stopping:
                        self.stop_all()
                        if not self.running:
                            return 0
                    else:
                        took = self.fill()
                        if not self.running and not took and self.done():
                            return 0
                except Exception as exc:  # noqa: BLE001 - the store away, a full disk: go on
                    self.say(f"warning: {type(exc).__name__}: {redact(str(exc)).strip()[:300]}"
                             "; trying again")  # fmt: skip
                    time.sleep(min(5.0, self.settings.heartbeat))
                time.sleep(self.settings.poll)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def done(self) -> bool:
        """Whether a worker with nothing to run exits: ``--once`` and ``--job`` when nothing
        is there to take; ``--drain`` once no job is left queued or running (a running job
        of a worker that died comes back to the queue when its lease expires)."""
        s = self.settings
        if s.drain:
            return self.store.count(["queued", "running"]) == 0
        return s.once or s.job_id is not None

    def free_devices(self) -> list[str]:
        busy = {r.device for r in self.running.values()}
        return [d for d in self.settings.devices if d not in busy]

    def fill(self) -> bool:
        took = False
        for device in self.free_devices():
            if self.settings.once and self.taken:
                break
            job = self.store.claim(
                self.name, self.host, device, self.settings.lease, self.settings.job_id
            )
            if job is None:
                break
            self.taken += 1
            took = True
            self.launch(job, device)
        return took

    # -- one job -------------------------------------------------------------------------
    def launch(self, job: JobRow, device: str) -> None:
        log = self.paths.log(job.id)
        try:
            secrets = unseal(self.paths, job.secrets)
            if job.kind == "train":
                args = train_command(job, write_job_config(self.paths, job.id, job.config))
            else:
                args = [sys.executable, "-m", "tunelab", *task_command(job)]
                self.paths.job_dir(job.id).mkdir(parents=True, exist_ok=True)
        except (TunelabError, OSError) as exc:
            self.end(job, "failed", f"could not start: {exc}", error=str(exc))
            return
        env = {
            **os.environ,
            "TUNELAB_JOB": str(job.id),
            "TUNELAB_RESULT_FILE": str(self.result_file(job)),
        }
        env.update({CREDENTIAL_ENV[k]: v for k, v in secrets.items() if k in CREDENTIAL_ENV})
        env["CUDA_VISIBLE_DEVICES"] = "" if device == "cpu" else device
        self.result_file(job).unlink(missing_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(
                f"=== attempt {job.attempts} on {self.name}, device {device}: "
                f"{' '.join(args[1:])}\n"
            )
        popen = process.start(args, log, env, self.paths.job_dir(job.id))
        started = process.start_time(popen.pid)
        self.running[job.id] = Running(job, device, popen, started)
        self.store.renew(job.id, self.name, self.settings.lease, pid=popen.pid, pid_started=started)
        self.store.note(job.id, f"process {popen.pid} started on {self.host}", self.name)
        self.say(f"job {job.id} ({job.name}) started on {device}, attempt {job.attempts}")

    def result_file(self, job: JobRow) -> Path:
        return self.paths.job_dir(job.id) / "result.json"

    def reap(self) -> None:
        for job_id, r in list(self.running.items()):
            code = r.popen.poll()
            if code is None:
                if r.cancel_sent and time.monotonic() - r.cancel_sent > self.settings.grace:
                    process.signal_group(r.popen.pid, signal.SIGKILL)
                continue
            if not r.lost:
                self.finished(r, code)  # if the store fails, the job stays tracked: next time
            del self.running[job_id]

    def finished(self, r: Running, code: int) -> None:
        job = r.job
        reported = self._read_result(job)
        run_state = _run_state(Path(job.run_dir)) if job.kind == "train" else {}
        step = run_state.get("step")
        at = f" at step {step}" if step is not None else ""
        if r.cancelled and code != 0:
            self.end(job, "stopped", f"cancelled; the process stopped{at}", exit_code=code)
            return
        if r.shutdown and code != 0:
            self.store.transition(
                job.id,
                "queued",
                f"worker {self.name} stopped; the job resumes from its last checkpoint",
                expect=["running"],
                held_by=self.name,
                attempts=job.attempts - 1,
            )
            self.say(f"job {job.id} requeued: this worker stops")
            return
        if code == 0:
            self.end(
                job,
                "completed",
                f"finished{at}",
                exit_code=0,
                result=job_result(job, "completed", 0),
            )
            return
        error = reported.get("error") or run_state.get("error") or _exit_reason(code)
        hint = (
            reported.get("hint")
            or run_state.get("hint")
            or (f"the job's log: tunelab jobs logs {job.id}")
        )
        self.end(
            job,
            "failed",
            f"failed: {error.splitlines()[0]}",
            exit_code=code,
            error=error,
            hint=hint,
            result=job_result(job, "failed", code, error, hint),
        )

    def end(self, job: JobRow, state: str, reason: str, **fields: Any) -> None:
        done = self.store.transition(
            job.id, state, reason, expect=["running"], held_by=self.name, **fields
        )
        self.say(
            f"job {job.id} {state}: {reason}"
            if done
            else f"job {job.id} was no longer this worker's; left as the store has it"
        )

    def _read_result(self, job: JobRow) -> dict[str, Any]:
        try:
            return json.loads(self.result_file(job).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    # -- leases, cancels, other workers' jobs --------------------------------------------
    def beat(self) -> None:
        for job_id, r in list(self.running.items()):
            fresh = self.store.renew(job_id, self.name, self.settings.lease)
            if fresh is None:  # requeued by another worker: the run must not go on twice
                if not r.lost:
                    self.say(f"job {job_id} is no longer this worker's: stopping its process")
                    r.lost = True
                    self._terminate(r)
                continue
            if fresh.cancel_requested and not r.cancelled:
                self.say(f"job {job_id}: cancel requested, stopping it (SIGTERM)")
                r.cancelled = True
                self._terminate(r)

    def _terminate(self, r: Running) -> None:
        """SIGTERM now (the run saves a checkpoint); :meth:`reap` sends SIGKILL after grace."""
        if r.cancel_sent is None:
            process.signal_group(r.popen.pid, signal.SIGTERM)
            r.cancel_sent = time.monotonic()

    def requeue_expired(self) -> None:
        for job in self.store.expired():
            if job.id in self.running:
                continue
            if job.host == self.host and job.pid and process.alive(job.pid, job.pid_started):
                self._stop_orphan(job)
                continue  # requeued once its process is gone, never while it runs
            self.orphans.pop(job.id, None)
            seen = job.lease_until.isoformat(timespec="seconds") if job.lease_until else "?"
            fields: dict[str, Any] = {}
            if job.cancel_requested:
                state, error = "stopped", None
                reason = f"cancelled; its worker {job.worker} stopped renewing its lease"
            elif job.attempts < job.max_attempts:
                state, error = "queued", None
                reason = (
                    f"worker {job.worker} stopped renewing its lease (due {seen}); the "
                    "job resumes from its last checkpoint"
                )
            else:
                state, error = "failed", f"its worker died while running it, {job.attempts} times"
                reason = f"failed: {error}"
                fields = {
                    "error": error,
                    "result": job_result(job, "failed", None, error),
                    "hint": f"see its log (tunelab jobs logs {job.id}), then tunelab jobs "
                    f"retry {job.id}",
                }
            done = self.store.transition(
                job.id,
                state,
                reason,
                expect=["running"],
                held_by=job.worker,
                by=self.name,
                lease_expired=True,
                **fields,
            )
            if done is not None:
                self.say(f"job {job.id} {state}: {reason}")

    def _stop_orphan(self, job: JobRow) -> None:
        """SIGTERM the process a dead worker left running (it saves a checkpoint), SIGKILL
        it once ``grace`` has passed; never waits, so this worker's own leases stay fresh."""
        deadline = self.orphans.get(job.id)
        if deadline is None:
            self.say(f"job {job.id}: its worker {job.worker} is gone; stopping its process "
                     f"{job.pid} before the job runs again")  # fmt: skip
            process.signal_group(job.pid, signal.SIGTERM)
            self.orphans[job.id] = time.monotonic() + self.settings.grace
        elif time.monotonic() > deadline:
            process.signal_group(job.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for r in self.running.values():
            if not r.shutdown:
                r.shutdown = True
                if r.cancel_sent is None:
                    process.signal_group(r.popen.pid, signal.SIGTERM)
                    r.cancel_sent = time.monotonic()


def _run_state(root: Path) -> dict[str, Any]:
    try:
        status = read_status(RunLayout(root).status)
    except RunDirError:
        return {}
    return {"step": status.step, "error": status.error, "hint": status.hint, "state": status.state}


def _exit_reason(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else code
        extra = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"the training process was killed by {name}{extra}"
    return f"the training process exited with code {code}"
