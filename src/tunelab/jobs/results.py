"""What a finished job answers, in the spirit of RunPod's ``output``: its status, exit code,
run directory, adapter and losses, and for a failure the message and the way out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.jobs.db import JobRow
from tunelab.rundir import RunLayout, read_json


def job_result(
    job: JobRow,
    status: str,
    exit_code: int | None,
    error: str | None = None,
    hint: str | None = None,
) -> dict[str, Any]:
    if job.kind != "train":  # the result of an evaluation, merge or export: where it is
        record: dict[str, Any] = {"status": status, "exit_code": exit_code, "job": job.id,
                                  "kind": job.kind, "output": job.run_dir}  # fmt: skip
        if error:
            record.update(error=error, hint=hint)
        return record
    layout = RunLayout(Path(job.run_dir))
    info = read_json(layout.info)
    weights = layout.adapter_weights if layout.adapter_weights.exists() else layout.full_weights
    result: dict[str, Any] = {
        "status": status,
        "exit_code": exit_code,
        "job": job.id,
        "run_id": job.request_id or job.name,
        "run_dir": str(layout.root),
        "adapter": str(layout.root) if weights.exists() else None,
        "model_id": job.model_id,
        "steps": info.get("steps"),
        "losses": info.get("losses") or {},
    }
    if error:
        result.update(error=error, hint=hint)
    return result
