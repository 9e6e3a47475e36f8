"""The processes a driver starts for a study, recorded so that a later driver, after this one was killed, stops
exactly those: each records its host, PID and start time in <study>/processes/ (a PID alone may since name
another process), and only a process on the same host with the same PID and start time is ever signalled."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from pathlib import Path

import psutil

from orch.methods.runtime.storage import holder
from orch.trial.state import write_json

PROCESSES = "processes"
RECORDS = "ORCH_PROCESS_RECORDS"
"""The environment variable that names the folder to the processes the driver starts (they inherit it)."""


def start_records(study_dir: Path) -> None:
    """Before a driver starts anything: an empty records folder, named to the processes it will start."""
    folder = study_dir / PROCESSES
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700)
    os.environ[RECORDS] = str(folder)


def end_records(study_dir: Path) -> None:
    """After a driver's processes have ended: no records left to act on."""
    os.environ.pop(RECORDS, None)
    shutil.rmtree(study_dir / PROCESSES, ignore_errors=True)


def record_process(pid: int | None = None) -> None:
    """Record this process (or, from the driver, one it started) for its study, if a driver named a folder."""
    if not (folder := os.environ.get(RECORDS)):
        return
    identity = holder() if pid is None else identity_of(pid)
    if identity is not None:
        write_json(Path(folder) / f"{identity['host']}-{identity['pid']}.json", identity)


def children() -> set[int]:
    """The PIDs of every process this one has started and that still runs (their children included)."""
    return {child.pid for child in psutil.Process().children(recursive=True)}


def record_children(besides: set[int]) -> None:
    """Record the processes this one has started, other than `besides` (those it had started before)."""
    for pid in children() - besides:
        record_process(pid)


def identity_of(pid: int) -> dict | None:
    try:
        return {"host": socket.gethostname(), "pid": pid, "started": psutil.Process(pid).create_time()}
    except psutil.NoSuchProcess:
        return None


def kill_recorded(study_dir: Path) -> list[int]:
    """SIGKILL what a killed driver of the study started and left running: every recorded process that is on
    this host and is still that very process; then forget the records. Returns the PIDs signalled."""
    killed = []
    for path in sorted((study_dir / PROCESSES).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # torn while being written: nothing to tell its process by
        if is_running(record):
            try:
                os.kill(record["pid"], signal.SIGKILL)
                killed.append(record["pid"])
            except ProcessLookupError:
                pass
    end_records(study_dir)
    return killed


def is_running(record: dict) -> bool:
    """Whether the recorded process runs on this host, as the very process recorded (not a reused PID)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    now = identity_of(record["pid"])
    return (
        now is not None and isinstance(record.get("started"), float) and abs(now["started"] - record["started"]) < 1e-3
    )
