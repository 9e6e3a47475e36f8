"""The local backend: trials one after the other in the orch process (for debugging, or where no Ray is wanted);
a data-parallel trial as that many processes on this machine."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import PositiveInt

from orch.backends.base import Backend, BackendParams, register_backend
from orch.progress import Progress
from orch.trial.state import TrialState
from orch.trial.status import OUTCOMES

if TYPE_CHECKING:
    from orch.execution.trial import Trial


class LocalParams(BackendParams):
    name: Literal["local"] = "local"
    workers_per_trial: PositiveInt = 1
    """Data-parallel processes per trial (docs/parallel.md; a trial's train.workers overrides it): each takes
    train.batch_size / workers of every batch; more than 1 runs the trial in that many new processes (gloo on
    CPU, NCCL and one GPU each on GPUs)."""


def run_ranks(trial: Trial, workers: int, progress: Callable[[int, dict], None]) -> None:
    """The trial in `workers` processes, rank 0's progress forwarded to `progress`. A rank that raised ends them
    all: rank 0 has recorded the trial's own failure by then, and one it could not record (a rank that died) is
    recorded here."""
    from torch.multiprocessing.spawn import ProcessException

    from orch.execution.distributed import run_local_ranks
    from orch.execution.ranks import ProgressReader, reset_channel, run_rank
    from orch.execution.records import finish_unrun

    reset_channel(trial.dir)
    forward = ProgressReader(trial.dir, progress)
    try:
        run_local_ranks(run_rank, workers, trial.config["train"]["device"], trial.dir, poll=forward)
        forward()
    except ProcessException as e:
        state = TrialState.load(Path(trial.dir))
        if state.status not in OUTCOMES:
            finish_unrun(trial, state, f"a data-parallel worker failed: {str(e).strip().splitlines()[-1][:300]}")


@register_backend("local")
class Local(Backend):
    """Sequentially, in this process (a data-parallel trial in that many processes)."""

    Params = LocalParams

    def run(self, trials: list[Trial], study_dir: Path, study: str, progress: Progress, say: Callable) -> None:
        from orch.execution.runner import run_trial
        from orch.execution.trial import finish_detail

        for trial in trials:
            progress.started(trial.id, TrialState.load(Path(trial.dir)).step)
            update = functools.partial(progress.update, trial.id)
            workers = self.params.trial_workers(trial.config)
            if workers > 1:
                run_ranks(trial, workers, update)
            else:
                run_trial(trial, progress=update)
            progress.finished(trial.id, *finish_detail(trial))
