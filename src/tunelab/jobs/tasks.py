"""Jobs other than training, on a finished run: a perplexity evaluation (its results kept
in the run's ``evaluations.csv``), a merge into a standard model, a GGUF export. Each runs
as the ``tunelab`` command that does it by hand, in the worker's process for the job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.jobs.db import JobRow
from tunelab.jobs.lab import LabPaths
from tunelab.jobs.store import Store
from tunelab.rundir import RunLayout

KINDS = ("eval", "merge", "export")
QUANTS = ("f16", "bf16", "f32", "q8_0")


def task_command(job: JobRow) -> list[str]:
    """The ``tunelab`` arguments that do ``job`` (not a training job)."""
    options: dict[str, Any] = job.config
    run = options["run"]
    checkpoint = ["--checkpoint", str(options["checkpoint"])] if options.get("checkpoint") else []
    if job.kind == "eval":
        extra = ["--comment", options["comment"]] if options.get("comment") else []
        extra += ["--base"] if options.get("base") else []
        return ["eval", "perplexity", run, "--data", options["data"], *checkpoint, *extra]
    if job.kind == "merge":
        return ["merge", run, "--output", job.run_dir, *checkpoint]
    if job.kind == "export":
        return ["export", run, "--output", job.run_dir, "--quant", options["quant"], *checkpoint]
    raise AssertionError(f"no command for a {job.kind} job")


def add_task(
    paths: LabPaths, store: Store, kind: str, run: Path, options: dict[str, Any]
) -> JobRow:
    """Queue a ``kind`` job on the finished ``run``; merges and exports write into
    ``LAB/exports/NAME``."""
    if kind not in KINDS:
        raise TunelabError(f"no job kind '{kind}'", f"one of: {', '.join(KINDS)}")
    if not RunLayout(run).is_run():
        raise TunelabError(f"{run}: not a run directory", "give a run of the lab")
    if kind == "eval" and not options.get("data"):
        raise TunelabError("an evaluation needs its data", "give data: a file to score")
    if kind == "export" and options.get("quant", "q8_0") not in QUANTS:
        raise TunelabError(f"quant {options['quant']}: not one tunelab exports",
                           f"one of: {', '.join(QUANTS)}")  # fmt: skip
    base = f"{run.name}-{kind}"
    name = next(f"{base}-{n}" for n in range(1, 10_000) if not store.name_taken(f"{base}-{n}"))
    out = run if kind == "eval" else paths.root / "exports" / name
    config = {"run": str(run), **options}
    if kind == "export":
        config.setdefault("quant", "q8_0")
    return store.add_job(reason=f"{kind} of {run.name} submitted", name=name, kind=kind,
                         config=config, run_dir=str(out))  # fmt: skip
