"""The Python API of a lab: queue training, follow it, and load what it made.

::

    from tunelab import Lab

    lab = Lab("my-lab")
    job = lab.apply("config.yaml")          # or a template name, a dict, a RunPod request
    job.wait()
    model, tokenizer = lab.load(job, checkpoint="best")

Importing this module imports no torch; checking a config (``apply``) and ``load`` do.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tunelab.config import LoadedConfig
from tunelab.errors import TunelabError
from tunelab.jobs.db import JobRow
from tunelab.jobs.lab import LabPaths, check_name, lab_path
from tunelab.jobs.states import FINAL
from tunelab.jobs.store import NotFound, Store
from tunelab.jobs.submit import Submission, given_config, submit
from tunelab.jobs.views import checkpoint_rows, job_record, run_rows, template_record
from tunelab.rundir import RunLayout, read_metrics


def full_check(loaded: LoadedConfig) -> None:
    """What ``tunelab validate`` checks (data, tokenizer, the model's shape and adapter),
    with what only the worker's machine can decide (a GPU, a tracker) left to it."""
    from tunelab.train.plan import plan_run

    plan_run(loaded, log=lambda _: None, strict=False)


class Job:
    """A queued job; its attributes are read from the store each time."""

    def __init__(self, lab: Lab, job_id: int) -> None:
        self.lab, self.id = lab, job_id

    def __repr__(self) -> str:
        return f"Job({self.id}, {self.row.name!r}, {self.status!r})"

    @property
    def row(self) -> JobRow:
        return self.lab.store.job(self.id)

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def status(self) -> str:
        return self.row.state

    @property
    def run_dir(self) -> Path:
        return Path(self.row.run_dir)

    @property
    def result(self) -> dict[str, Any] | None:
        return self.row.result

    def info(self) -> dict[str, Any]:
        """Everything ``tunelab jobs show --json`` prints."""
        return job_record(self.lab.store, self.row, events=True)

    def wait(self, timeout: float | None = None, poll: float = 1.0) -> str:
        """Block until the job ends; its final state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (state := self.status) not in FINAL:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} is still {state} after {timeout} s")
            time.sleep(poll)
        return state

    def cancel(self) -> str:
        return self.lab.store.request_cancel(self.id, "cancelled from Python").state

    def logs(self) -> str:
        """What its training printed, every attempt."""
        path = self.lab.paths.log(self.id)
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def metrics(self) -> list[dict[str, Any]]:
        """The run's ``metrics.jsonl`` records: loss, eval_loss, learning_rate per step."""
        return read_metrics(RunLayout(self.run_dir).metrics)


class Lab:
    """A lab directory and its job store (``TUNELAB_DB`` may put the store elsewhere)."""

    def __init__(self, path: str | Path | None = None, db: str | None = None) -> None:
        self.paths = LabPaths(lab_path(path))
        self.paths.create()
        self.store = Store(db or self.paths.store_url())

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- queueing ------------------------------------------------------------------------
    def apply(
        self,
        what: str | Path | dict[str, Any] | LoadedConfig,
        wait: bool = False,
        *,
        sets: list[str] | None = None,
        sweeps: list[str] | None = None,
        name: str | None = None,
        max_attempts: int = 3,
    ) -> Job | list[Job]:
        """Queue ``what``: a config file, a template's name, a config as a dict, a RunPod
        request (``{"input": {...}}``) or a loaded config. ``wait`` runs it with a worker
        in a child process and returns when it ends. A sweep returns a list of jobs."""
        sub = Submission(
            sets=list(sets or []), sweeps=list(sweeps or []), name=name, max_attempts=max_attempts
        )
        if isinstance(what, LoadedConfig):
            sub.source = given_config(what)
        elif isinstance(what, dict):
            sub.source = what
        elif Path(what).is_file():
            sub.source = Path(what)
        else:
            try:
                self.store.template(check_name(str(what), "template"))
            except (NotFound, TunelabError):
                raise TunelabError(
                    f"'{what}' is neither a config file nor a template of this lab",
                    "give a YAML or JSON file, or one of: tunelab template list",
                ) from None
            sub.template = str(what)
        queued = submit(self.paths, self.store, sub, full_check)
        jobs = [Job(self, row.id) for row in queued.jobs]
        if wait:
            for job in jobs:
                self.run_worker(job=job.id)
                job.wait()
        return jobs if sub.sweeps else jobs[0]

    def run_worker(self, job: int | None = None, devices: str | None = None) -> int:
        """Run a worker in a child process until the queue is empty (or ``job`` ended);
        ``devices`` as ``tunelab worker --devices`` (default: every GPU, else the CPU)."""
        args = [sys.executable, "-m", "tunelab", "worker", "--lab", str(self.paths.root)]
        args += ["--devices", devices] if devices else []
        args += ["--job", str(job)] if job is not None else ["--drain"]
        return subprocess.run(args, stdout=subprocess.DEVNULL, check=False).returncode

    def save_template(self, name: str, config: str | Path | dict[str, Any]) -> dict[str, Any]:
        from tunelab.jobs.templates import save_template

        return template_record(save_template(self.paths, self.store, name, config, full_check))

    # -- looking -------------------------------------------------------------------------
    def jobs(self, state: str | None = None) -> list[Job]:
        return [Job(self, r.id) for r in self.store.jobs([state] if state else None)]

    def job(self, ref: int | str) -> Job:
        return Job(self, self.store.job(ref).id)

    def show(self, what: str, of: Any = None) -> list[dict[str, Any]]:
        """``templates``, ``jobs``, ``runs`` or ``checkpoints`` (of a job or run: ``of``)."""
        if what == "templates":
            return [template_record(t) for t in self.store.templates()]
        if what == "jobs":
            return [job_record(self.store, r) for r in self.store.jobs()]
        if what == "runs":
            return run_rows(self.paths.runs)
        if what == "checkpoints":
            if of is None:
                raise TunelabError("show('checkpoints', of=JOB_OR_RUN): which run's?")
            return checkpoint_rows(self._run_dir(of))
        raise TunelabError(f"cannot show '{what}'", "show templates, jobs, runs or checkpoints")

    def _run_dir(self, ref: Any) -> Path:
        if isinstance(ref, Job):
            return ref.run_dir
        if isinstance(ref, (str, Path)) and Path(ref).is_dir():
            return Path(ref)
        if isinstance(ref, str) and (self.paths.runs / ref).is_dir():
            return self.paths.runs / ref
        if isinstance(ref, str) and ref in {t.name for t in self.store.templates()}:
            done = [j for j in self.store.jobs(["completed"]) if j.template == ref]
            if not done:
                raise TunelabError(f"no job of template {ref} has completed yet",
                                   "tunelab jobs list shows where its jobs are")  # fmt: skip
            return Path(done[-1].run_dir)  # the latest
        return Path(self.store.job(ref).run_dir)

    def load(
        self,
        ref: Any,
        checkpoint: str | int | None = None,
        load_in_4bit: bool = False,
        merge: bool = False,
    ) -> tuple[Any, Any]:
        """(model, tokenizer) of a job's run (a Job, a job id or name, a run directory, a
        run name in the lab, or a template's name: its latest completed job): the base
        with the adapter attached, ready to generate;
        ``checkpoint`` "best", "last" or a step; ``merge`` folds the adapter in."""
        from tunelab.infer.load import load, resolve_target

        target = resolve_target(self._run_dir(ref), None if checkpoint is None else str(checkpoint))
        loaded = load(
            [target], bits=4 if load_in_4bit else None, log=lambda _: None, for_merge=merge
        )
        model = loaded.model
        if merge and not target.full:
            model = model.merge_and_unload()
        return model, loaded.tokenizer
