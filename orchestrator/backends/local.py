"""The local backend: trials one after the other in the orch process (for debugging, or where no Ray is wanted)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from orchestrator.backends import Backend, BackendParams, register_backend
from orchestrator.progress import Progress
from orchestrator.trial.runner import Trial, finish_detail, run_trial
from orchestrator.trial.state import TrialState


class LocalParams(BackendParams):
    name: Literal["local"] = "local"


@register_backend("local")
class Local(Backend):
    """Sequentially, in this process."""

    Params = LocalParams

    def run(self, trials: list[Trial], study_dir: Path, study: str, progress: Progress, say: Callable) -> None:
        for trial in trials:
            progress.started(trial.id, TrialState.load(Path(trial.dir)).step)
            run_trial(trial, progress=lambda step, metrics, t=trial: progress.update(t.id, step, metrics))
            progress.finished(trial.id, *finish_detail(trial))
