"""Small file utilities: atomic writes and content hashes.

Everything the project writes goes through a temporary file in the same folder followed by
``os.replace``, so a killed process never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


_UMASK = os.umask(0)
os.umask(_UMASK)

#: Environment variable of the fault-injection hook (see :func:`fault_point`).
FAULT_ENV = "DTRAK_FAULT"
_fault_hits: dict[str, int] = {}


class OutputError(ValueError):
    """An output or cache folder cannot take what is about to be written (one line, names the folder)."""


def fault_point(name: str) -> None:
    """A named write point; a test hook that kills this process there.

    With ``DTRAK_FAULT=name`` the process is killed (SIGKILL: no ``finally``, no flush, as a
    power cut or the OOM killer) the first time it reaches ``name``; ``DTRAK_FAULT=name@N``
    the N-th time (1-based). ``DTRAK_FAULT=name@N:stop`` stops it there instead (SIGSTOP,
    until the test sends SIGCONT): a writer delayed at an exact point, for concurrency tests.
    Without the variable this is a dictionary lookup and nothing else. The fault harness
    (``tests/reliability``) kills every long command at each of its points and checks that a
    rerun gives byte-identical results.
    """
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    where, _, action = wanted.partition(":")
    target, _, nth = where.partition("@")
    if target != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)


def _existing_ancestor(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def ensure_writable(folder: str | os.PathLike, need_bytes: int = 0, what: str = "output") -> None:
    """Check, before long work starts, that ``folder`` (or the folder that would hold it) can be
    written and has ``need_bytes`` free; else an :class:`OutputError` naming the folder and the
    numbers. Creates nothing."""
    folder = Path(folder)
    probe_dir = _existing_ancestor(folder)
    if not probe_dir.is_dir():
        raise OutputError(f"cannot write the {what} to {folder}: {probe_dir} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dtrak-write-check.", dir=probe_dir)
    except OSError as error:
        raise OutputError(f"cannot write the {what} to {folder}: {error.strerror or error}") from None
    os.close(fd)
    os.unlink(probe)
    free = shutil.disk_usage(probe_dir).free
    if need_bytes > free:
        raise OutputError(f"not enough free space for the {what} in {folder}: needs {format_bytes(need_bytes)}, "
                          f"{format_bytes(free)} free")


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KB'`` (powers of 1024, one decimal)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes the file private (0600); give it the permissions of a normal new file.
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, waiting for any other holder to let go.

    ``on_wait`` is called once, before waiting, when another process holds the lock (to say so).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def try_lock(path: str | os.PathLike) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` if no other process holds it; yields whether it does.

    The kernel drops the lock when its holder dies, so a killed worker never leaves a stale lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(target: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(target, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_array(array: np.ndarray) -> str:
    """Hash of an array's dtype, shape and bytes (C order)."""
    h = hashlib.sha256()
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())
