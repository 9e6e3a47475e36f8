"""A data-parallel trial's ranks and the process that watches them: rank 0 appends its progress reports to
<trial>/progress.jsonl, which the watcher (the local backend, or the trial's Ray Tune trial) forwards to the
progress view or to Tune, and stops early when the watcher leaves <trial>/stop_requested (a search's scheduler
stopped the trial). Files, because a rank runs in a process of its own that the watcher cannot call."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from orch.execution.runner import run_trial
from orch.execution.trial import EarlyStopped, Trial
from orch.methods.runtime.parallel import world_of

PROGRESS_LOG, STOP_REQUEST = "progress.jsonl", "stop_requested"


def run_rank(trial_dir: str) -> None:
    """One rank of a data-parallel trial, in a process group already joined (a module-level function: new
    processes import it)."""
    trial = Trial.load(trial_dir)
    channel, stop = Path(trial_dir, PROGRESS_LOG), Path(trial_dir, STOP_REQUEST)

    def progress(step: int, metrics: dict) -> None:
        with channel.open("a") as f:
            f.write(json.dumps({"step": step, "metrics": metrics}) + "\n")
        if stop.exists():
            raise EarlyStopped(f"stopped early by the scheduler after step {step}")

    run_trial(trial, progress=progress if world_of()[0] == 0 else None)


def reset_channel(trial_dir: str) -> None:
    """Before the ranks start: no progress or stop request of an earlier run."""
    Path(trial_dir, PROGRESS_LOG).unlink(missing_ok=True)
    Path(trial_dir, STOP_REQUEST).unlink(missing_ok=True)


def request_stop(trial_dir: str) -> None:
    Path(trial_dir, STOP_REQUEST).touch()


class ProgressReader:
    """Forwards the complete lines rank 0 has appended since the last call to `progress(step, metrics)`."""

    def __init__(self, trial_dir: str, progress: Callable[[int, dict], None]):
        self.channel, self.progress, self.read = Path(trial_dir, PROGRESS_LOG), progress, 0

    def __call__(self) -> None:
        if not self.channel.exists():
            return
        with self.channel.open("rb") as f:
            f.seek(self.read)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.read += len(complete)
        for line in complete.splitlines():
            report = json.loads(line)
            self.progress(report["step"], report["metrics"])
