"""The trial directory is the single source of truth: state.json, the metrics log and atomic checkpoints."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from orch.methods.runtime.storage import atomic_write_bytes
from orch.trial.status import PENDING, STATUSES, UNREADABLE

log = logging.getLogger(__name__)

METRICS_LOG = "metrics.jsonl"
"""Every metric a trial logged, one JSON row per line: MLflow's copy can be rebuilt from it."""
WRITER_LOCK = "writer.lock"
"""Held by the one process that records a trial (rank 0) while it runs: whoever else would write its outcome
(a search settling a sample the scheduler stopped) waits for it, or for its death."""


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> dict:
    """A small JSON record orch wrote, or {} when it is missing or unreadable (a torn or corrupted file)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class TrialState:
    status: str = PENDING
    step: int = 0
    run_id: str | None = None
    reason: str | None = None
    result: dict[str, float] = field(default_factory=dict)
    """The latest evaluation (e.g. {"eval/kl/nfe_1": 0.42}): what a resumed search reports for a finished trial."""
    fingerprints: dict[str, str] = field(default_factory=dict)
    """metric → the fingerprint its values in `result` were measured under (see orchestrator/trial/config.py)."""
    job_id: str | None = None
    """The Slurm job running the trial, when it runs under Slurm."""
    logged_step: int = -1
    """Metrics up to this step are logged: a trial resumed from an older checkpoint does not log them again."""
    unlogged: bool = False
    """Rows of the metrics log may be missing from MLflow (a write failed): the next driver logs them."""
    warnings: list[str] = field(default_factory=list)
    """Warnings of the trial's worker (e.g. an unreadable checkpoint skipped), shown by the driver."""
    updated: float = field(default_factory=time.time)

    @classmethod
    def load(cls, trial_dir: Path) -> TrialState:
        """The trial's state; an unreadable state.json gives status `unreadable` with the reason, never a crash."""
        path = trial_dir / "state.json"
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            state = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
            if state.status not in STATUSES or not isinstance(state.step, int):
                raise ValueError(f"status {state.status!r}, step {state.step!r}")
            return state
        except (OSError, ValueError, TypeError, AttributeError) as e:
            return cls(UNREADABLE, reason=f"{path} is unreadable ({type(e).__name__}: {e})")

    def save(self, trial_dir: Path) -> None:
        self.updated = time.time()
        write_json(trial_dir / "state.json", asdict(self))


FINAL_RESULTS = "final.json"
"""<trial>/final.json of `orch eval`: {"units": its results by key, "logged": the rows (key, value, step) MLflow
took, "tags": the tags it took} — what rebuilds a lost store's final metrics."""

CHECKPOINT = re.compile(r"^step_(\d{9})\.pt$")


def checkpoint_paths(trial_dir: Path) -> list[Path]:
    """Checkpoints of a trial, newest first."""
    folder = trial_dir / "checkpoints"
    if not folder.exists():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)), reverse=True)


def newest_checkpoint_step(trial_dir: Path) -> int:
    """The step of the newest checkpoint file (0 when there is none)."""
    paths = checkpoint_paths(trial_dir)
    return int(CHECKPOINT.match(paths[0].name).group(1)) if paths else 0


def save_checkpoint(trial_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Atomically write the checkpoint of `step`, then delete all but the newest `keep`."""
    folder = trial_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:09d}.pt"
    tmp = folder / f".{path.name}.tmp{os.getpid()}"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in checkpoint_paths(trial_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(trial_dir: Path) -> dict | None:
    """Newest readable checkpoint; a corrupt one is skipped with a warning and the previous one used."""
    for path in checkpoint_paths(trial_dir):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a torn or corrupted file: any unpickling error
            log.warning("checkpoint %s is unreadable (%s); falling back to the previous one", path, e)
    return None


def load_checkpoint_at(trial_dir: Path, step: int) -> dict | None:
    """The checkpoint of `step` (kept by train.keep_checkpoints), or None when it is not kept."""
    path = trial_dir / "checkpoints" / f"step_{step:09d}.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def append_metrics(trial_dir: Path, rows: list[tuple[str, float, int]]) -> None:
    """Append rows to the metrics log, after ending a line torn by an earlier failed write (e.g. a full disk)."""
    with open(trial_dir / METRICS_LOG, "a+b") as f:
        if f.tell():  # opened at its end; writes always go there
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.writelines((json.dumps({"key": k, "value": v, "step": s}) + "\n").encode() for k, v, s in rows)
        f.flush()
        os.fsync(f.fileno())


def read_metrics(trial_dir: Path) -> list[tuple[str, float, int]]:
    """The metrics log, one row per (key, step) (the last one written wins); a torn last line is skipped."""
    path = trial_dir / METRICS_LOG
    rows: dict[tuple[str, int], float] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
            rows[(row["key"], int(row["step"]))] = float(row["value"])
        except (ValueError, KeyError, TypeError):
            continue
    return [(k, v, s) for (k, s), v in rows.items()]
