"""The queue's commands of `tunelab`: worker, template, submit and jobs. Apart from
``template save`` and ``submit`` (which check a config as ``validate`` does), none of them
imports torch."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tunelab.config.load import add_set_option
from tunelab.errors import TunelabError

LIGHT = (
    "worker",
    "template list",
    "template show",
    "template delete",
    "jobs list",
    "jobs show",
    "jobs logs",
    "jobs cancel",
    "jobs retry",
    "jobs rm",
    "jobs compare",
)


def _lab(args: argparse.Namespace):
    from tunelab.jobs.api import Lab

    return Lab(args.lab)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str))


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_worker(args: argparse.Namespace) -> int:
    from tunelab.jobs.worker import Settings, Worker, default_devices

    devices = [d.strip() for d in (args.devices or default_devices()).split(",") if d.strip()]
    if not devices or ("cpu" in devices and len(devices) > 1):
        raise TunelabError(f"--devices {args.devices}: give cpu, or GPU numbers like 0,1")
    settings = Settings(
        devices,
        args.lease,
        args.heartbeat or min(10.0, args.lease / 3),
        args.grace,
        args.poll,
        args.once,
        args.drain,
        args.job,
    )
    lab = _lab(args)
    try:
        return Worker(lab.paths, lab.store, settings, lambda s: print(s, flush=True)).run()
    finally:
        lab.close()


def cmd_template_save(args: argparse.Namespace) -> int:
    from tunelab.jobs.api import full_check
    from tunelab.jobs.templates import config_of_run, save_template

    if bool(args.config) == bool(args.from_run):
        raise TunelabError("give a config file or --from-run RUN (one of them)")
    source = config_of_run(Path(args.from_run)) if args.from_run else args.config
    with _lab(args) as lab:
        row = save_template(
            lab.paths,
            lab.store,
            args.name,
            source,
            full_check,
            args.description,
            args.replace,
            args.sets,
        )
    print(f"template {row.name} saved (from {row.source})")
    return 0


def cmd_template_list(args: argparse.Namespace) -> int:
    with _lab(args) as lab:
        rows = lab.show("templates")
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no templates yet: tunelab template save NAME CONFIG")
    for r in rows:
        cfg = r["config"]
        data = ", ".join(Path(d.get("path", "?")).name for d in cfg.get("datasets") or [])
        print(
            f"{r['name']:24} {cfg.get('base_model', 'default model')}  {data}  "
            f"(updated {r['updated']})"
        )
    return 0


def cmd_template_show(args: argparse.Namespace) -> int:
    import yaml

    from tunelab.jobs.views import template_record

    with _lab(args) as lab:
        record = template_record(lab.store.template(args.name))
    if args.json:
        _print_json(record)
    else:
        print(f"# template {record['name']} (from {record['source']}, updated {record['updated']})")
        print(yaml.safe_dump(record["config"], sort_keys=False), end="")
    return 0


def cmd_template_delete(args: argparse.Namespace) -> int:
    with _lab(args) as lab:
        lab.store.delete_template(args.name)
    print(f"template {args.name} deleted")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from tunelab.jobs.api import full_check
    from tunelab.jobs.submit import Submission, submit

    if bool(args.config) == bool(args.template):
        raise TunelabError("give a config file (or request) or --template NAME (one of them)")
    sub = Submission(
        Path(args.config) if args.config else None,
        args.template,
        args.sets,
        args.sweep,
        args.name,
        args.priority,
        args.max_attempts,
    )
    with _lab(args) as lab:
        queued = submit(lab.paths, lab.store, sub, full_check)
        for note in queued.notes:
            _say(f"note: {note}")
        if args.json:
            from tunelab.jobs.views import job_record

            _print_json([job_record(lab.store, j) for j in queued.jobs])
        else:
            for j in queued.jobs:
                print(j.id)
            group = queued.jobs[0].group
            if group:
                _say(
                    f"queued {len(queued.jobs)} jobs as group {group} "
                    f"(tunelab jobs compare {group})"
                )
        if not args.wait:
            return 0
        return max(_follow(lab, j.id) for j in queued.jobs)


def _progress_line(record: dict[str, Any]) -> str:
    p = record.get("progress") or {}
    if record["state"] == "queued":
        return f"job {record['id']}: queued, position {record['position']}"
    if not p:
        return f"job {record['id']}: {record['state']}"
    if p.get("run_state") == "preparing":
        return f"job {record['id']}: preparing ({p.get('doing') or 'starting'})"
    loss = f", loss {p['last_loss']:.4f}" if p.get("last_loss") is not None else ""
    eta = f", about {p['eta_seconds']} s left" if p.get("eta_seconds") is not None else ""
    return f"job {record['id']}: step {p.get('step')}/{p.get('total_steps') or '?'}{loss}{eta}"


def _follow(lab, job_id: int) -> int:
    """Print the job's progress until it ends; its exit code (0 completed, 1 otherwise)."""
    from tunelab.jobs.states import FINAL
    from tunelab.jobs.views import job_record

    last, waited = None, 0.0
    while True:
        record = job_record(lab.store, lab.store.job(job_id))
        line = _progress_line(record)
        if line != last:
            _say(line)
            last = line
        if record["state"] in FINAL:
            break
        if record["state"] == "queued" and waited > 30 and waited % 60 < 1:
            _say("  (still queued: is a worker running? start one with: tunelab worker)")
        time.sleep(1.0)
        waited += 1.0
    return _print_end(record)


def _print_end(record: dict[str, Any]) -> int:
    if record["state"] == "completed":
        print(f"job {record['id']} completed: {record['run_dir']}")
        return 0
    print(
        f"job {record['id']} {record['state']}"
        + (f": {record['error']}" if record["error"] else "")
    )
    if record.get("hint"):
        print(f"  fix: {record['hint']}")
    return 1


def _duration(seconds: Any) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from tunelab.jobs.views import job_record

    with _lab(args) as lab:
        order = lab.store.queue_order()
        rows = [
            job_record(lab.store, j, order=order)
            for j in lab.store.jobs([args.state] if args.state else None, args.group)
        ]
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no jobs: tunelab submit CONFIG queues one")
        return 0
    print(f"{'ID':>4} {'NAME':32} {'STATE':9} {'POS':>3} {'PROGRESS':14} {'ETA':>6} DEVICE")
    for r in rows:
        p = r["progress"]
        done = f"{p.get('step', 0)}/{p.get('total_steps') or '?'}" if p else ""
        print(
            f"{r['id']:>4} {r['name'][:32]:32} {r['state']:9} {r['position'] or '':>3} "
            f"{done:14} {_duration(p.get('eta_seconds')):>6} {r['device'] or ''}"
        )
        if r["state"] == "failed" and r["error"]:
            print(f"      error: {r['error'].splitlines()[0]}")
            if r["hint"]:
                print(f"      fix: {r['hint']}")
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    from tunelab.jobs.views import job_record

    with _lab(args) as lab:
        record = job_record(lab.store, lab.store.job(args.job), events=True)
    if args.json:
        _print_json(record)
        return 0
    for key in (
        "id",
        "name",
        "state",
        "position",
        "template",
        "group",
        "run_dir",
        "device",
        "worker",
        "attempts",
        "created",
        "started",
        "finished",
        "error",
        "hint",
    ):
        if record[key] is not None:
            print(f"{key + ':':10} {record[key]}")
    print(_progress_line(record))
    print("events:")
    for e in record["events"]:
        print(f"  {e['at']}  {(e['from'] or '-'):>9} -> {e['state']:9} {e['reason']}")
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    from tunelab.jobs.states import FINAL

    with _lab(args) as lab:
        job = lab.store.job(args.job)
        path = lab.paths.log(job.id)
        offset = 0
        while True:
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
            if (
                not args.follow
                or lab.store.job(job.id).state in FINAL
                and offset >= (path.stat().st_size if path.exists() else 0)
            ):
                break
            time.sleep(0.5)
        if not path.exists() and not args.follow:
            _say(f"job {job.id} has no log yet ({job.state})")
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _lab(args) as lab:
        job = lab.store.request_cancel(lab.store.job(args.job).id, "cancelled by the user")
    print(
        f"job {job.id} stopped"
        if job.state == "stopped"
        else f"job {job.id}: asked its worker to stop it (it saves a checkpoint first)"
    )
    return 0


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    from tunelab.jobs.submit import retry

    with _lab(args) as lab:
        old = lab.store.job(args.job)
        new = retry(lab.store, old)
    print(new.id)
    _say(f"job {new.id} queued: it continues {old.run_dir} from its last complete checkpoint")
    if old.request_id:
        _say(
            "note: a request's credentials are not kept once its job ends; they are not "
            "passed to the retry"
        )
    return 0


def cmd_jobs_rm(args: argparse.Namespace) -> int:
    with _lab(args) as lab:
        job = lab.store.job(args.job)
        lab.store.delete_job(job.id)
    print(f"job {job.id} removed from the list (its run stays in {job.run_dir})")
    return 0


def _best_loss(record: dict[str, Any]) -> float | None:
    from tunelab.rundir import RunLayout, read_json

    losses = (record.get("result") or {}).get("losses") or (
        read_json(RunLayout(Path(record["run_dir"])).info).get("losses") or {}
    )
    return losses.get("best_eval_loss")


def cmd_jobs_compare(args: argparse.Namespace) -> int:
    from tunelab.jobs.views import job_record

    with _lab(args) as lab:
        rows = [job_record(lab.store, j, events=True) for j in lab.store.jobs(group=args.group)]
    if not rows:
        raise TunelabError(f"no jobs in group {args.group}", "tunelab jobs list shows groups")
    keys = sorted({k for r in rows for k in r["config"]} - {"output_dir"})
    differ = [
        k for k in keys if len({json.dumps(r["config"].get(k), sort_keys=True) for r in rows}) > 1
    ]
    table = [
        {
            "id": r["id"],
            "name": r["name"],
            "state": r["state"],
            "settings": {k: r["config"].get(k) for k in differ},
            "best_eval_loss": _best_loss(r),
        }
        for r in rows
    ]
    table.sort(key=lambda t: (t["best_eval_loss"] is None, t["best_eval_loss"] or 0.0))
    if args.json:
        _print_json(table)
        return 0
    print(f"{'ID':>4} {'STATE':9} {'BEST VAL LOSS':>13}  " + "  ".join(differ))
    for t in table:
        loss = f"{t['best_eval_loss']:.4f}" if t["best_eval_loss"] is not None else "-"
        values = "  ".join(f"{k}={t['settings'][k]}" for k in differ)
        print(f"{t['id']:>4} {t['state']:9} {loss:>13}  {values}")
    return 0


COMMANDS = {
    "worker": (cmd_worker, "run queued jobs, one per device, until stopped"),
    "template save": (cmd_template_save, "check a config and keep it as a named template"),
    "template list": (cmd_template_list, "list the lab's templates"),
    "template show": (cmd_template_show, "print a template's config"),
    "template delete": (cmd_template_delete, "delete a template"),
    "submit": (cmd_submit, "queue a config, a template or a RunPod-style request as a job"),
    "jobs list": (cmd_jobs_list, "the lab's jobs: state, queue position, progress, ETA"),
    "jobs show": (cmd_jobs_show, "one job: its settings, progress and every change of state"),
    "jobs logs": (cmd_jobs_logs, "what a job's training printed (-f follows it)"),
    "jobs cancel": (cmd_jobs_cancel, "stop a job (a running one saves a checkpoint first)"),
    "jobs retry": (cmd_jobs_retry, "queue a failed or stopped job again, resuming its run"),
    "jobs rm": (cmd_jobs_rm, "remove an ended job from the list (its run stays)"),
    "jobs compare": (cmd_jobs_compare, "a sweep's jobs side by side, best validation loss first"),
}


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lab",
        help="the lab directory (default: $TUNELAB_LAB, else "
        "~/.local/share/tunelab/lab); $TUNELAB_DB may name a PostgreSQL store",
    )
    json_flag = name in (
        "template list",
        "template show",
        "jobs list",
        "jobs show",
        "jobs compare",
        "submit",
    )
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON")
    if name == "worker":
        p.add_argument(
            "--devices",
            help="cpu, or the GPUs to use, one job each: 0,1 (default: every GPU nvidia-smi "
            "lists, else cpu)",
        )
        p.add_argument("--once", action="store_true", help="run one job, then exit")
        p.add_argument(
            "--drain", action="store_true", help="exit once every job of the lab has ended"
        )
        p.add_argument("--job", type=int, help="run this queued job only, then exit")
        p.add_argument(
            "--lease",
            type=float,
            default=60.0,
            help="seconds before another worker may take back a job whose worker "
            "stopped renewing it (default 60)",
        )
        p.add_argument("--heartbeat", type=float, help="seconds between lease renewals")
        p.add_argument(
            "--grace",
            type=float,
            default=60.0,
            help="seconds a stopped job has to save its checkpoint before SIGKILL",
        )
        p.add_argument("--poll", type=float, default=1.0, help="seconds between looks")
    elif name == "template save":
        p.add_argument("name", help="the template's name")
        p.add_argument("config", nargs="?", help="a config file (YAML or JSON)")
        p.add_argument("--from-run", help="copy the settings of this run instead")
        p.add_argument("--description", help="a line saying what it is for")
        p.add_argument("--replace", action="store_true", help="overwrite a template of that name")
        add_set_option(p, "change a setting of the config (dotted keys), repeatable")
    elif name in ("template show", "template delete"):
        p.add_argument("name", help="the template's name")
    elif name == "submit":
        p.add_argument("config", nargs="?", help="a config file, or a RunPod-style request.json")
        p.add_argument("--template", help="queue this template instead of a file")
        add_set_option(p, "change a setting (dotted keys), repeatable")
        p.add_argument(
            "--sweep",
            action="append",
            default=[],
            metavar="KEY=V1,V2",
            help="queue one job per value (and per combination), repeatable",
        )
        p.add_argument("--name", help="the job's name (and its run directory's)")
        p.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
        p.add_argument(
            "--max-attempts",
            type=int,
            default=3,
            help="times a job is started again after its worker died (default 3)",
        )
        p.add_argument(
            "--wait",
            action="store_true",
            help="follow the job to its end; exit 0 only if it completed",
        )
    elif name == "jobs list":
        p.add_argument("--state", help="only jobs in this state")
        p.add_argument("--group", help="only the jobs of this sweep")
    elif name == "jobs compare":
        p.add_argument("group", help="the sweep's group name (tunelab submit prints it)")
    elif name.startswith("jobs "):
        p.add_argument("job", help="the job's id or name")
        if name == "jobs logs":
            p.add_argument("-f", "--follow", action="store_true", help="follow until it ends")
