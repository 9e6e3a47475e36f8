"""Files written by the science side: atomic writes and orch's cache of derived data."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path


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


@contextmanager
def exclusive(lock_path: Path):
    """Hold an exclusive lock on a file (blocks until it is free): work done once across processes."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
