"""From what a user hands over (a config file, a template with overrides, a dict, a
RunPod-style request, a sweep) to queued jobs: each config loaded and checked exactly as
``tunelab validate`` checks it, its local paths made absolute (a worker runs elsewhere),
its run directory chosen in the lab."""

from __future__ import annotations

import glob
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from tunelab.config import LoadedConfig, load_config, resolved_dict
from tunelab.config.load import read_config_file
from tunelab.errors import ConfigError, TunelabError
from tunelab.jobs.db import JobRow
from tunelab.jobs.lab import LabPaths, check_name, seal
from tunelab.jobs.store import Store

Check = Callable[[LoadedConfig], None]
REQUEST_KEYS = frozenset({"user_id", "model_id", "run_id", "credentials", "args"})
CREDENTIALS = frozenset({"wandb_api_key", "hf_token"})


@dataclass
class Request:
    """A RunPod-style ``{"input": {...}}`` request, taken apart."""

    args: dict[str, Any]
    run_id: str | None = None
    user_id: str | None = None
    model_id: str | None = None
    credentials: dict[str, str] = field(default_factory=dict)


def is_request(data: Any) -> bool:
    return isinstance(data, dict) and set(data) == {"input"} and isinstance(data["input"], dict)


def parse_request(data: dict[str, Any]) -> Request:
    """The request's parts; its problems all at once (never echoing a credential)."""
    body = data["input"]
    problems = [
        f"input.{k}: unknown request key (a request has {', '.join(sorted(REQUEST_KEYS))})"
        for k in sorted(set(body) - REQUEST_KEYS)
    ]
    args = body.get("args")
    if not isinstance(args, dict):
        problems.append("input.args: a request needs its config as a mapping under input.args")
    texts = {}
    for key in ("run_id", "user_id", "model_id"):
        value = body.get(key)
        if value is not None and not isinstance(value, (str, int)):
            problems.append(f"input.{key}: expected text")
        texts[key] = None if value in (None, "") else str(value)
    creds = body.get("credentials") or {}
    if not isinstance(creds, dict):
        problems.append("input.credentials: expected a mapping (wandb_api_key, hf_token)")
        creds = {}
    problems += [
        f"input.credentials.{k}: unknown credential (known: hf_token, wandb_api_key)"
        for k in sorted(set(creds) - CREDENTIALS)
    ]
    problems += [
        f"input.credentials.{k}: expected text"
        for k, v in sorted(creds.items())
        if k in CREDENTIALS and v is not None and not isinstance(v, str)
    ]
    if texts["run_id"] is not None:
        try:
            check_name(texts["run_id"], "input.run_id")
        except TunelabError as exc:
            problems.append(f"{exc.message}: {exc.hint}")
    if problems:
        raise ConfigError(problems, "the request")
    kept = {k: v for k, v in creds.items() if k in CREDENTIALS and v}
    return Request(dict(args), texts["run_id"], texts["user_id"], texts["model_id"], kept)


def _absolute(value: Any) -> Any:
    """A local path, relative to the current directory, made absolute; others unchanged."""
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
        return value
    local = Path(value).expanduser()
    if local.exists() or (glob.has_magic(value) and glob.glob(value)):
        return str(Path.cwd() / local)
    return value


def absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config with every local file it names made absolute."""
    out = dict(config)
    for key in ("base_model", "lora_model_dir", "tokenizer_config"):
        if key in out:
            out[key] = _absolute(out[key])
    if isinstance(out.get("dataset_prepared_path"), str):
        out["dataset_prepared_path"] = str(
            Path(out["dataset_prepared_path"]).expanduser().absolute()
        )
    for key in ("datasets", "pretraining_dataset"):
        if isinstance(out.get(key), list):
            out[key] = [
                {**e, **{k: _absolute(e.get(k)) for k in ("path", "format_file") if e.get(k)}}
                for e in out[key]
            ]
    return out


def given_config(loaded: LoadedConfig) -> dict[str, Any]:
    """The keys the user set (in tunelab's own names, whatever dialect the file was in, with
    its tool's defaults where that tool differs), local paths absolute: loaded again, it
    means what the original meant, defaults included."""
    resolved = resolved_dict(loaded.config)
    return absolute_paths({k: v for k, v in resolved.items() if loaded.given(k)})


def sweep_grid(sweeps: Sequence[str]) -> list[list[str]]:
    """``KEY=V1,V2`` items -> every combination, as lists of ``KEY=V`` settings."""
    axes = []
    for item in sweeps:
        key, _, values = item.partition("=")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not key.strip() or not choices:
            raise ConfigError([f"--sweep {item}: expected KEY=VALUE1,VALUE2,..."])
        axes.append([f"{key.strip()}={v}" for v in choices])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


@dataclass
class Submission:
    """What to queue: a config (file, dict or template) with its settings."""

    source: str | Path | dict[str, Any] | None = None
    template: str | None = None
    sets: list[str] = field(default_factory=list)
    sweeps: list[str] = field(default_factory=list)
    name: str | None = None
    priority: int = 0
    max_attempts: int = 3


@dataclass
class Queued:
    jobs: list[JobRow]
    notes: list[str]
    existing: bool = False  # a request seen before: its job, not a new one


def submit(paths: LabPaths, store: Store, sub: Submission, check: Check) -> Queued:
    """Queue the job(s) ``sub`` describes, each checked by ``check`` first (all of a sweep
    before any is queued)."""
    data, source_dir, base = _raw(store, sub)
    request = parse_request(data) if is_request(data) else None
    if request:
        data = {"input": {"args": request.args}}  # read as a request's axolotl keys
        if request.run_id:
            seen = store.job_by_request(request.run_id)
            if seen is not None:
                return Queued(
                    [seen],
                    [
                        f"request {request.run_id} was queued before, as job "
                        f"{seen.id}: nothing new queued"
                    ],
                    existing=True,
                )
        base = request.run_id or request.model_id or base
    notes: list[str] = []
    prepared = []
    grid = sweep_grid(sub.sweeps)
    for combo in grid:
        loaded = load_config(
            data=data,
            sets=[*sub.sets, *combo],
            source_dir=source_dir,
            source=str(sub.source) if isinstance(sub.source, (str, Path)) else None,
        )
        check(loaded)
        notes += [n for n in loaded.notes if n not in notes]
        if loaded.given("output_dir"):
            note = f"output_dir {loaded.config.output_dir} is not used: a job trains in the lab"
            notes += [note] if note not in notes else []
        prepared.append((loaded, combo))
    group = _group_name(store, base) if len(grid) > 1 else None
    queued = []
    for loaded, combo in prepared:
        name = sub.name if sub.name and len(grid) == 1 else None
        label = "-".join(c.replace("=", "") for c in combo)
        wanted = request.run_id if request and request.run_id else name
        queued.append(_add(paths, store, loaded, wanted, group or base, label, group, sub, request))
    return Queued(queued, notes)


def _raw(store: Store, sub: Submission) -> tuple[dict[str, Any], Path | None, str]:
    if sub.template is not None:
        return dict(store.template(sub.template).config), None, sub.template
    if isinstance(sub.source, dict):
        return dict(sub.source), None, "job"
    if sub.source is None:
        raise ConfigError(["nothing to queue: give a config file, a template or a request"])
    path = Path(sub.source)
    return read_config_file(path), path.parent, path.stem


def _group_name(store: Store, base: str) -> str:
    """``BASE-sweepN``: the first N no job's group has."""
    taken = store.groups()
    return next(f"{base}-sweep{n}" for n in itertools.count(1) if f"{base}-sweep{n}" not in taken)


def _add(
    paths: LabPaths,
    store: Store,
    loaded: LoadedConfig,
    wanted: str | None,
    base: str,
    label: str,
    group: str | None,
    sub: Submission,
    request: Request | None,
) -> JobRow:
    config = given_config(loaded)
    for name in _names(base, label, wanted):
        run_dir = paths.runs / name
        if wanted is None and (store.name_taken(name) or run_dir.exists()):
            continue
        config["output_dir"] = str(run_dir)
        try:
            return store.add_job(
                reason=f"submitted{f' from template {sub.template}' if sub.template else ''}",
                name=name,
                config=config,
                run_dir=str(run_dir),
                template=sub.template,
                group=group,
                priority=sub.priority,
                max_attempts=sub.max_attempts,
                request_id=request.run_id if request else None,
                owner=request.user_id if request else None,
                model_id=request.model_id if request else None,
                secrets=seal(paths, request.credentials) if request else None,
            )
        except IntegrityError:  # another submission took the name (or the request) first
            seen = store.job_by_request(request.run_id) if request and request.run_id else None
            if seen is not None:
                return seen
            if wanted:
                raise TunelabError(
                    f"a job named '{name}' exists already", "choose another name"
                ) from None
    raise AssertionError("unreachable: names are endless")


def _names(base: str, label: str, wanted: str | None) -> Iterator[str]:
    """The job name asked for, else ``BASE[-LABEL]-N`` for N = 1, 2, ..."""
    if wanted:
        yield check_name(wanted, "job name")
        return
    stem = check_name(f"{base}-{label}" if label else base, "job name")
    if label:
        yield stem
    for n in itertools.count(1):
        yield f"{stem}-{n}"


def retry(store: Store, old: JobRow) -> JobRow:
    """Queue a failed or stopped job again: a new job on the same config that continues the
    same run from its last complete checkpoint (a finished job itself never changes)."""
    if old.state not in ("failed", "stopped"):
        raise TunelabError(f"job {old.id} is {old.state}; only a failed or stopped job is retried")
    busy = [j for j in store.jobs(["queued", "running"]) if j.run_dir == old.run_dir]
    if busy:
        raise TunelabError(
            f"job {busy[0].id} ({busy[0].state}) already continues {old.run_dir}",
            "wait for it to end; two jobs never train into one run directory",
        )
    n = next(n for n in itertools.count(1) if not store.name_taken(f"{old.name}.retry{n}"))
    return store.add_job(
        reason=f"retry of job {old.id}",
        name=f"{old.name}.retry{n}",
        config=old.config,
        run_dir=old.run_dir,
        template=old.template,
        group=old.group,
        owner=old.owner,
        model_id=old.model_id,
        retry_of=old.id,
        priority=old.priority,
        max_attempts=old.max_attempts,
    )
