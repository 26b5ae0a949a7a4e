"""One writer per run folder: an advisory lock (``fcntl.flock``) on ``OUTPUT_DIR/run.lock``, held for the life of the
process. The lock file says who holds it (pid, host, start time); the kernel releases the lock when the holder
dies, so a run killed without cleanup leaves a stale lock that the next run takes over (and says so)."""

from __future__ import annotations

import atexit
import datetime
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = "run.lock"
_HELD: dict[str, tuple[int, int]] = {}  # real path of the folder -> (fd of its lock file, pid that took it)


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock; ``holder`` is what it wrote (pid, host, started)."""

    def __init__(self, folder: Path, holder: dict):
        self.folder, self.holder = folder, holder
        super().__init__(f"--output-dir: {folder} is in use by another run ({describe(holder)}); wait for it to "
                         "end or give another --output-dir")  # fmt: skip


def describe(info: dict) -> str:
    """``pid 123 on host h, started 2026-01-01T00:00:00Z`` (what is known of a lock holder)."""
    if not info:
        return "holder unknown: it has not written its pid yet"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"


def _read_info(fd: int) -> dict:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        info = json.loads(raw) if raw.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _holder(fd: int) -> dict:
    """The holder's info; it is written just after the lock is taken, so wait a moment for an empty file."""
    for _ in range(20):
        info = _read_info(fd)
        if info:
            return info
        time.sleep(0.05)
    return {}


def acquire_run_lock(folder: Path) -> dict | None:
    """Take ``folder``'s lock for this process (again in the same process: a no-op). Returns the previous holder's
    info when it died holding the lock (a stale lock, now taken over), else None. Raises :class:`RunLockedError`
    when another live process holds it, ``OSError`` when the folder cannot be created or written.

    Example: ``stale = acquire_run_lock(Path("runs/bpo"))``
    """
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _HELD:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunLockedError(folder, holder) from None
    except OSError:
        os.close(fd)
        raise
    previous = _read_info(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "argv": sys.argv}  # fmt: skip
    if previous:
        info["took_over_from"] = previous
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except OSError:
        os.close(fd)
        raise
    _HELD[key] = (fd, os.getpid())
    return previous or None


def release_run_lock(folder: Path) -> None:
    """Release ``folder``'s lock if this process holds it, clearing the holder's info (a clean end: the next run
    finds no stale lock). The lock is released at exit anyway."""
    entry = _HELD.pop(os.path.realpath(Path(folder)), None)
    if entry is None:
        return
    fd, pid = entry
    try:
        if pid == os.getpid():  # a forked child shares the fd: only the process that took the lock clears it
            os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        release_run_lock(Path(key))
