"""Files written by the science side: atomic writes, orch's cache of derived data, and a lock that works on the
shared filesystems clusters use."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import psutil


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:  # e.g. a full disk: leave the old file, and no half-written temporary beside it
        tmp.unlink(missing_ok=True)
        raise


def cache_dir() -> Path:
    """orch's cache of derived files (decoded image folders, FID weights and reference features):
    $ORCH_CACHE_DIR, else ~/.cache/orch."""
    return Path(os.environ.get("ORCH_CACHE_DIR") or Path.home() / ".cache" / "orch")


HEARTBEAT_SECONDS = 10.0
"""How often a lock's holder refreshes its lock file's modification time."""
STALE_SECONDS = 120.0
"""A lock file whose holder on another host has not refreshed it for this long is taken over."""
UNNAMED_SECONDS = 5.0


def holder() -> dict:
    """This process as a lock holder: its host, PID and start time (a PID alone may be reused)."""
    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": me.pid, "started": me.create_time()}


def holder_gone(record: dict, age: float) -> bool:
    """Whether the process a lock file names is gone: on this host, no live process with that PID and start
    time; on another host (nothing to ask), no heartbeat for STALE_SECONDS. A file that names nobody (a holder
    writes its name as soon as it has the file) is stale after a few seconds."""
    if not record:
        return age > UNNAMED_SECONDS
    if record.get("host") != socket.gethostname():
        return age > STALE_SECONDS
    try:
        process = psutil.Process(record["pid"])
        return process.status() == psutil.STATUS_ZOMBIE or abs(process.create_time() - record["started"]) > 1e-3
    except (psutil.NoSuchProcess, KeyError, TypeError):
        return True


def remove_if_stale(lock_path: Path) -> bool:
    """Take away a lock file whose holder is gone; True when it was removed. The file is first renamed to a name
    of its own (atomic), so that of two processes that both found it stale only one removes it."""
    try:
        record = json.loads(lock_path.read_text() or "{}")
        age = time.time() - lock_path.stat().st_mtime
    except (OSError, ValueError):
        return False  # gone meanwhile, or being written: look again
    if not holder_gone(record, age):
        return False
    claimed = lock_path.with_name(f"{lock_path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(lock_path, claimed)
    except OSError:
        return False
    claimed.unlink(missing_ok=True)
    return True


@contextmanager
def exclusive(lock_path: Path, poll_seconds: float = 0.2):
    """Hold an exclusive lock (blocks until it is free): work done once across processes and hosts.

    The lock is the file itself, created with O_CREAT | O_EXCL, which is atomic on local and NFS filesystems
    alike (unlike flock, which NFS does not honour everywhere). It names its holder (host, PID, start time), and
    a heartbeat thread refreshes its modification time, so that a lock whose holder died (kill -9, a lost
    node) is taken over: at once on the same host, after STALE_SECONDS without a heartbeat from another one.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if not remove_if_stale(lock_path):
                time.sleep(poll_seconds)
    with os.fdopen(fd, "w") as f:
        json.dump(holder(), f)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(lock_path)
            except OSError:
                return

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        lock_path.unlink(missing_ok=True)
