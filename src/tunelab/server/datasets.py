"""Datasets sent to the server: kept in the lab's ``datasets/`` under names the server
chooses, within a size limit, and previewed as ``tunelab data inspect --json`` shows them
(detected format, rendered samples, trained tokens marked)."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from fastapi import HTTPException, UploadFile

from tunelab.errors import ConfigError, TunelabError
from tunelab.files import TEMP_PREFIX
from tunelab.jobs.process import stop_with_parent
from tunelab.server.checks import TIMEOUT

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
CHUNK = 1 << 20


def stored_name(original: str) -> str:
    """A safe, new name keeping the original's stem (readable) and suffix (the format)."""
    suffix = Path(original).suffix.lower()
    if suffix not in SUFFIXES:
        raise HTTPException(415, f"{original}: not a data file tunelab reads "
                                 f"({', '.join(SUFFIXES)})")  # fmt: skip
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(original).stem).strip("-")[:60] or "data"
    return f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"


async def save_upload(folder: Path, upload: UploadFile, limit: int) -> Path:
    """Write the upload into ``folder`` (never half-written: beside, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / stored_name(upload.filename or "data.json")
    partial = folder / f"{TEMP_PREFIX}{target.name}"
    size = 0
    try:
        with open(partial, "wb") as out:
            while chunk := await upload.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"{upload.filename}: larger than this server's "
                                             f"limit of {limit // (1 << 20)} MB")  # fmt: skip
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def listing(folder: Path) -> list[dict[str, Any]]:
    if not folder.is_dir():
        return []
    return [
        {"name": p.name, "path": str(p), "bytes": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(TEMP_PREFIX)
    ]


def find(folder: Path, name: str) -> Path:
    path = (folder / name).resolve()
    if path.parent != folder.resolve() or not path.is_file():
        raise HTTPException(404, f"no dataset {name} in this lab")
    return path


def inspect_args(path: Path, base_model: str | None, dataset_format: str | None,
                 data_template: str | None, n: int, format_file: str | None = None,
                 sets: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """The arguments of ``tunelab data inspect`` for a preview (``--flag=value``: a template
    may start with a dash); ``sets`` are KEY=VALUE config changes (sequence_len=512)."""
    args = [f"--data={path}", "--json", "-n", str(n)]
    for flag, value in (("--base-model", base_model), ("--dataset-format", dataset_format),
                        ("--data-template", data_template),
                        ("--format-file", format_file)):  # fmt: skip
        if value:
            args.append(f"{flag}={value}")
    return args + [f"--set={change}" for change in sets]


IDLE = 300.0  # seconds unused before the preview process is stopped (it holds torch)
SERVICE = [sys.executable, "-m", "tunelab", "data", "inspect", "--serve"]


class _Gone(Exception):
    """The preview process ended before it answered."""


class Previewer:
    """Dataset previews from one long-lived ``tunelab data inspect --serve`` process, which
    keeps torch, transformers and recent tokenizers loaded: the first preview takes the
    seconds those take, the next ones a fraction. Started on first use, started again if it
    died, stopped once unused for ``idle`` seconds and by :meth:`close`; one request at a
    time. Its stderr (notes, tracebacks) is appended to ``log``."""

    def __init__(self, log: Path, idle: float = IDLE, timeout: float = TIMEOUT) -> None:
        self.log, self.idle, self.timeout = log, idle, timeout
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._log_start = 0  # where the running process's part of the log begins
        self._last_used = 0.0
        self._timer: threading.Timer | None = None
        self._starter: ThreadPoolExecutor | None = None
        self._closes = 0  # a request that sees this change was stopped by close()

    @property
    def pid(self) -> int | None:
        """The preview process's pid while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def preview(self, path: Path, base_model: str | None, dataset_format: str | None,
                data_template: str | None, n: int, format_file: str | None = None,
                sets: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
        """What ``tunelab data inspect --json`` says of the file."""
        args = inspect_args(path, base_model, dataset_format, data_template, n, format_file,
                            sets)  # fmt: skip
        return json.loads(self.inspect(args))

    def preview_config(self, config: dict[str, Any], n: int) -> dict[str, Any]:
        """What ``tunelab data inspect CONFIG --json`` says of a config's data (the page's
        form as it stands: its datasets, data settings and tokenizer)."""
        with tempfile.TemporaryDirectory(prefix="tunelab-preview-") as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            return json.loads(self.inspect([str(path), "--json", "-n", str(n)]))

    def inspect(self, args: list[str]) -> str:
        """What ``tunelab data inspect ARGS`` prints; its error raised as
        :func:`~tunelab.server.checks.run_tunelab` raises it."""
        with self._lock:
            self._cancel_timer()
            try:
                reply = self._ask(args, self._closes)
            finally:
                self._last_used = time.monotonic()
                self._schedule_stop()
        return _output(reply)

    def close(self) -> None:
        """Stop the process (an answer it is working on is given up) and the threads."""
        self._closes += 1
        self._stop()  # without the lock: a request in flight ends now, not at its timeout
        with self._lock:
            self._cancel_timer()
            self._stop()
            if self._starter is not None:
                self._starter.shutdown()
                self._starter = None

    def _ask(self, args: list[str], closes: int) -> dict[str, Any]:
        """The reply to one request; a process found dead, or dying on it, is started again
        and asked once more."""
        for attempt in (1, 2):
            if self.pid is None:
                self._start()
            try:
                return self._exchange(args)
            except _Gone:  # its pipes close before it can be waited for: wait here
                self._stop()
                if closes != self._closes:
                    raise TunelabError("the dataset preview was stopped: the server is "
                                       "shutting down") from None  # fmt: skip
                if attempt == 2:
                    raise TunelabError(
                        f"the dataset preview process failed: {self._last_error()}",
                        f"its log: {self.log}",
                    ) from None
        raise AssertionError("unreachable")

    def _exchange(self, args: list[str]) -> dict[str, Any]:
        """Send one request line and read the answer line, within ``timeout``."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"argv": args}).encode() + b"\n")
        except (BrokenPipeError, ValueError):  # ValueError: its pipe closed by close()
            raise _Gone from None
        line = _read_line(proc.stdout.fileno(), time.monotonic() + self.timeout)
        if line is None:
            self._stop()
            raise TunelabError(
                f"the dataset preview took longer than {self.timeout:.0f} s and was stopped",
                "try a smaller data file or fewer examples, or see the log: " + str(self.log),
            )
        return json.loads(line)

    def _start(self) -> None:
        """Start the process from a thread that lives as long as this object: the kernel
        stops the process when the thread that started it ends (``stop_with_parent``), and
        the server's request threads come and go."""
        self._stop()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        if self._starter is None:
            self._starter = ThreadPoolExecutor(1, thread_name_prefix="tunelab-preview")
        self._proc = self._starter.submit(self._spawn).result()

    def _spawn(self) -> subprocess.Popen:
        parent = os.getpid()
        with open(self.log, "ab") as log:
            return subprocess.Popen(
                SERVICE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, bufsize=0,
                start_new_session=True,  # a Ctrl-C meant for the server is the server's
                preexec_fn=lambda: stop_with_parent(parent),
            )  # fmt: skip

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()

    def _schedule_stop(self, delay: float | None = None) -> None:
        self._timer = threading.Timer(self.idle if delay is None else delay, self._stop_if_idle)
        self._timer.daemon = True
        self._timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _stop_if_idle(self) -> None:
        """The idle timer's end: stop the process unless a request is being answered (its
        end sets a new timer)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            left = self._last_used + self.idle - time.monotonic()
            if left <= 0:
                self._stop()
            elif self._proc is not None:  # the timer woke early
                self._schedule_stop(left)
        finally:
            self._lock.release()

    def _last_error(self) -> str:
        """The error the process last wrote to the log, else its last line."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._log_start)
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        error = next((ln[7:] for ln in reversed(lines) if ln.startswith("error: ")), None)
        return error or (lines[-1] if lines else "it exited")


def _read_line(fd: int, deadline: float) -> bytes | None:
    """One line from ``fd``; None at the ``deadline``. The process answers one line per
    request, so nothing is read past it."""
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            raise _Gone
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            return b"".join(chunks)


def _output(reply: dict[str, Any]) -> str:
    """What the command printed; its failure raised as ``run_tunelab`` raises it."""
    if "stdout" in reply:
        return reply["stdout"]
    record = reply["failure"]
    if record.get("problems"):
        raise ConfigError(record["problems"])
    raise TunelabError(record.get("error") or "tunelab data failed", record.get("hint"))
