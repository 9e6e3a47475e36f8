"""One live driver per study: the orch process running a study is recorded in <study>/driver.json (its PID and
start time, and what its backend started); a second one is refused, `orch cancel` finds it, and a record left by
a killed driver is recognised as such. The `orch eval` processes of a study are recorded likewise (several may
run), for `orch cancel`."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import psutil

from orch.methods.runtime.storage import exclusive
from orch.trial.state import read_json, write_json

DRIVER_RECORD = "driver.json"


class StudyBusy(Exception):
    """Another live orch process is running this study."""


def alive(pid: int) -> bool:
    """Whether the process exists and has not exited (a zombie awaiting its parent's wait() has)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def process_started(pid: int) -> float | None:
    """When the process started (seconds since the epoch), or None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def driver_record(**extra) -> dict:
    """This process as a study's driver. Its start time goes with its PID: a killed driver's PID may since name
    another process (e.g. after a container restart), which must be neither waited for nor signalled."""
    return {"driver_pid": os.getpid(), "driver_started": process_started(os.getpid()), **extra}


def recorded_driver(study_dir: Path) -> dict:
    return read_json(study_dir / DRIVER_RECORD)


def live_driver(record: dict) -> int | None:
    """The PID of the driver a record names if that very process still runs."""
    pid, started = record.get("driver_pid"), record.get("driver_started")
    if not isinstance(pid, int) or not isinstance(started, float) or not alive(pid):
        return None
    return pid if abs((process_started(pid) or 0.0) - started) < 1e-3 else None


def claim_study(study_dir: Path, **extra) -> dict:
    """Record this process as the study's driver (`orch cancel` signals it), refusing a study that another live
    orch process is running (StudyBusy). Returns the previous record: what a killed driver left, for its backend
    to clean up."""
    with exclusive(study_dir / "driver.lock"):  # two submissions starting at once: one claims, one is refused
        previous = recorded_driver(study_dir)
        if (pid := live_driver(previous)) not in (None, os.getpid()):
            raise StudyBusy(f"study {study_dir.name!r} is being run by orch process {pid}")
        write_json(study_dir / DRIVER_RECORD, driver_record(**extra))
    return previous


def note_in_record(study_dir: Path, **extra) -> None:
    """Add to this driver's record what its backend started (e.g. an embedded Ray's temp dir)."""
    write_json(study_dir / DRIVER_RECORD, recorded_driver(study_dir) | extra)


def release_study(study_dir: Path) -> None:
    (study_dir / DRIVER_RECORD).unlink(missing_ok=True)


EVALUATORS = "evaluators"
"""<study>/evaluators/<pid>.json: the `orch eval` processes working on the study (several may), for `orch cancel`."""


@contextmanager
def evaluating(study_dir: Path):
    """Record this process as an `orch eval` of the study while the block runs."""
    record = study_dir / EVALUATORS / f"{os.getpid()}.json"
    record.parent.mkdir(exist_ok=True)
    write_json(record, driver_record())
    try:
        yield
    finally:
        record.unlink(missing_ok=True)


def live_evaluators(study_dir: Path) -> list[int]:
    """The PIDs of the `orch eval` processes recorded for the study that still run (each its very process); the
    record of one that ended without removing it (killed) is removed."""
    records = sorted((study_dir / EVALUATORS).glob("*.json")) if (study_dir / EVALUATORS).is_dir() else []
    live = []
    for record in records:
        if (pid := live_driver(read_json(record))) is None:
            record.unlink(missing_ok=True)
        else:
            live.append(pid)
    return live
