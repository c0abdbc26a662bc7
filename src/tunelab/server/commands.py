"""``tunelab serve``: the API over a lab, with a worker beside it unless told not to."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from tunelab.errors import TunelabError

LIGHT = ("serve",)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tunelab.access import Access, server_token
    from tunelab.jobs import process
    from tunelab.jobs.api import Lab
    from tunelab.server.app import create_app

    token = server_token(args.host, args.token)
    roots = [Path(r).expanduser().resolve() for r in args.data_root]
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        raise TunelabError(f"--data-root: no such directory: {', '.join(missing)}")
    lab = Lab(args.lab)
    worker = None
    if not args.no_worker:
        parent = os.getpid()  # uvicorn ends this process by its own signal: the worker
        worker = subprocess.Popen(  # is told to stop (and requeue its jobs) by the kernel
            [sys.executable, "-m", "tunelab", "worker", "--lab", str(lab.paths.root)],
            preexec_fn=lambda: process.stop_with_parent(parent),
        )
    alone = "" if worker else " (no worker: run tunelab worker elsewhere)"
    print(f"tunelab serve: lab {lab.paths.root} on http://{args.host}:{args.port}/{alone}",
          flush=True)  # fmt: skip
    try:
        app = create_app(
            lab.paths,
            lab.store,
            Access(token),
            roots,
            max_upload=args.max_upload_mb << 20,
            model_idle=args.model_idle,
        )
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if worker is not None:
            worker.terminate()  # it stops its jobs (they save a checkpoint) and requeues them
            worker.wait()
        lab.close()
    return 0


COMMANDS = {"serve": (cmd_serve, "serve the REST API over a lab (and run a worker beside it)")}


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("--lab", help="the lab directory (default: $TUNELAB_LAB, else "
                   "~/.local/share/tunelab/lab)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument("--token", help="the token clients must give (default: $TUNELAB_TOKEN); "
                   "required on any address but loopback")  # fmt: skip
    p.add_argument("--data-root", action="append", default=[], metavar="DIR",
                   help="a directory whose files configs sent over HTTP may name, besides the "
                   "lab; repeatable")  # fmt: skip
    p.add_argument("--max-upload-mb", type=int, default=200, help="largest upload (200 MB)")
    p.add_argument(
        "--model-idle",
        type=float,
        default=600.0,
        help="seconds before an unused chat model process is stopped (600)",
    )
    p.add_argument("--no-worker", action="store_true",
                   help="run no worker here (workers run elsewhere on the same lab)")  # fmt: skip
