"""Writes that are never seen half-done, and directories that one process at a time may write.

Files and directories are written beside their place under a name starting with
:data:`TEMP_PREFIX`, synced and renamed into place. A process killed before the rename
leaves such a name behind; :func:`remove_leftovers` clears them, and nothing else.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tunelab.errors import RunDirError

TEMP_PREFIX = ".tunelab-tmp-"


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` beside ``path``, sync it and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; these are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temporary_directory(beside: Path, name: str) -> Path:
    """A new, empty directory in ``beside`` whose name marks it as a leftover if not renamed."""
    beside.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}-", dir=beside))
    folder.chmod(0o755)
    return folder


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Fill a hidden sibling of ``target``; on success it replaces ``target`` whole."""
    staging = temporary_directory(target.parent, target.name)
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_leftovers(folder: Path, *stems: str) -> list[str]:
    """Delete what interrupted writes left in ``folder`` (never anything else), only those
    whose names continue with one of ``stems`` if any are given; returns their names."""
    if not folder.is_dir():
        return []
    prefixes = tuple(TEMP_PREFIX + stem for stem in stems) or (TEMP_PREFIX,)
    found = [p for p in folder.iterdir() if p.name.startswith(prefixes)]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return [p.name for p in found]


def lock_path(target: Path) -> Path:
    """The lock file of directory ``target``: beside it, so it survives ``target`` being
    replaced whole."""
    return target.parent / f".{target.name}.lock"


def _holder(path: Path) -> str:
    try:
        pid, _, host = path.read_text(encoding="utf-8").strip().partition(" ")
    except OSError:
        return "another process"
    if not pid.isdigit():
        return "another process"
    return f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def _acquire(path: Path, target: Path) -> int:
    """An open, locked descriptor of the lock file ``path``; refused at once if held."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(
                f"{target}: this run directory is being written by {_holder(path)}; nothing "
                "was changed",
                "wait for that run to end (or stop it), or choose another --output",
            ) from None
        if _same_file(path, fd):
            return fd
        os.close(fd)  # the previous holder removed it between our open and lock: again


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextmanager
def exclusive(target: Path) -> Iterator[None]:
    """Hold directory ``target`` for this process alone: an OS lock on a file beside it,
    released when the process ends, however it ends. A second holder is refused at once,
    naming the first one's pid."""
    path = lock_path(target.resolve())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, target)
    except OSError as exc:  # a read-only parent, or a file system without locks
        raise RunDirError(
            f"{target}: cannot lock it for this run ({exc.strerror or exc}: {path})",
            "choose an --output in a folder you can write to",
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield
    finally:
        if _same_file(path, fd):  # while still held: a waiting opener re-checks the inode
            path.unlink(missing_ok=True)
        os.close(fd)
