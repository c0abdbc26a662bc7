"""Saved templates: a validated config (checked as ``tunelab validate`` checks it) kept
under a name, referring to its data files rather than copying them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.jobs.db import TemplateRow
from tunelab.jobs.lab import LabPaths, check_name
from tunelab.jobs.store import Store
from tunelab.jobs.submit import Check, given_config
from tunelab.rundir import RunLayout


def config_of_run(run: Path) -> Path:
    """The config a run trained with (text-generation-webui's "copy parameters from")."""
    layout = RunLayout(run)
    if not layout.config.is_file():
        raise TunelabError(
            f"{run}: not a run directory (no config.yaml)",
            "give the output_dir of a tunelab run, e.g. LAB/runs/NAME",
        )
    return layout.config


def save_template(
    paths: LabPaths,
    store: Store,
    name: str,
    source: str | Path | dict[str, Any],
    check: Check,
    description: str | None = None,
    replace: bool = False,
    sets: list[str] | None = None,
) -> TemplateRow:
    """Check ``source`` (a config file or a dict) as validate does, then keep it as ``name``."""
    check_name(name, "template name")
    if isinstance(source, dict):
        loaded = load_config(data=source, sets=sets)
    else:
        loaded = load_config(source, sets=sets)
    check(loaded)
    config = given_config(loaded)
    config.pop("output_dir", None)  # each job of a template gets its own run directory
    where = None if isinstance(source, dict) else str(Path(source).resolve())
    return store.save_template(name, config, where, description, replace)
