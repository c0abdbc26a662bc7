"""Model processes for chat and generation: ``tunelab serve-model`` started on demand for a
run (or checkpoint), on a free loopback port with a token of its own, reused while it is
used and stopped once idle. The server never loads a model itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tunelab.errors import TunelabError
from tunelab.jobs.process import stop_with_parent

START_TIMEOUT = 600.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ModelProcess:
    key: tuple[str, str | None]
    proc: subprocess.Popen
    url: str
    token: str
    log: Path
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0  # requests it is answering now: never stopped while it answers

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
            self.last_used = time.monotonic()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ModelProcesses:
    """One model process per (run, checkpoint), each with the base model beside the tuned
    one (``--compare``), so answers can be set side by side."""

    def __init__(self, logs: Path, idle: float) -> None:
        self.logs, self.idle = logs, idle
        self.running: dict[tuple[str, str | None], ModelProcess] = {}
        self._lock = asyncio.Lock()

    async def get(self, run: Path, checkpoint: str | None) -> ModelProcess:
        key = (str(run), checkpoint)
        async with self._lock:
            current = self.running.get(key)
            if current is not None and current.proc.poll() is None:
                current.last_used = time.monotonic()
                return current
            # started from the event loop's thread, which lives as long as the server: the
            # kernel's "stop with the parent" is told by the end of the thread that forked
            started = self._spawn(key)
            try:
                await asyncio.to_thread(self._until_ready, started)
            except BaseException:  # never left running unknown: not loaded, or not waited for
                await asyncio.to_thread(started.stop)
                raise
            self.running[key] = started
            return started

    def _spawn(self, key: tuple[str, str | None]) -> ModelProcess:
        run, checkpoint = key
        port, token = _free_port(), secrets.token_urlsafe(24)
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"model-{port}.log"
        args = [sys.executable, "-m", "tunelab", "serve-model", run, "--compare", "--port",
                str(port)] + (["--checkpoint", checkpoint] if checkpoint else [])  # fmt: skip
        with open(log, "wb") as out:
            parent = os.getpid()
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "TUNELAB_TOKEN": token},
                                    preexec_fn=lambda: stop_with_parent(parent))  # fmt: skip
        return ModelProcess(key, proc, f"http://127.0.0.1:{port}/v1", token, log)

    def _until_ready(self, started: ModelProcess) -> None:
        run, proc, log = started.key[0], started.proc, started.log
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                lines = log.read_text(errors="replace").strip().splitlines()
                error = next((ln[7:] for ln in reversed(lines) if ln.startswith("error: ")),
                             lines[-1] if lines else "it exited")  # fmt: skip
                raise TunelabError(f"the model of {run} could not be loaded: {error}")
            try:
                if httpx.get(f"{started.url}/models", headers=started.headers,
                             timeout=2).status_code == 200:  # fmt: skip
                    started.last_used = time.monotonic()  # idle from now, not from the start
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        started.stop()
        raise TunelabError(f"the model of {run} took longer than {START_TIMEOUT:.0f} s to load")

    async def stop_idle(self) -> None:
        """Stop the processes nobody asked anything for ``idle`` seconds."""
        async with self._lock:
            now = time.monotonic()
            for key, m in list(self.running.items()):
                idle = not m.busy and now - m.last_used > self.idle
                if idle or m.proc.poll() is not None:
                    await asyncio.to_thread(m.stop)
                    del self.running[key]

    def stop_all(self) -> None:
        for m in self.running.values():
            m.stop()
        self.running.clear()
