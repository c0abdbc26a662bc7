"""TensorBoard alongside training, and on its own for past runs."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

from tunelab.errors import TunelabError


def free_port(preferred: int, tries: int = 20) -> int:
    """``preferred`` if nothing listens there, else the next free port after it."""
    for port in range(preferred, preferred + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise TunelabError(
        f"no free port for TensorBoard between {preferred} and {preferred + tries - 1}"
    )


def command(logdir: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
        "--port", str(port), "--host", "127.0.0.1",
    ]  # fmt: skip


def start(logdir: Path, port: int) -> tuple[subprocess.Popen, int]:
    """A TensorBoard server in the background; stop it with :func:`stop`."""
    port = free_port(port)
    process = subprocess.Popen(
        command(logdir, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return process, port


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def serve(logdir: Path, port: int) -> int:
    """Run TensorBoard in the foreground until it is stopped (Ctrl-C)."""
    if not logdir.exists():
        raise TunelabError(
            f"{logdir}: no such directory", "give a run directory or a folder of runs"
        )
    port = free_port(port)
    print(f"TensorBoard for {logdir} at http://127.0.0.1:{port}/ (Ctrl-C stops it)", flush=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)  # stop the server with this process
    process = subprocess.Popen(command(logdir, port), stderr=subprocess.DEVNULL)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(process)
        signal.signal(signal.SIGTERM, previous)
