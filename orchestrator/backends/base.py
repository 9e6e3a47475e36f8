"""The backend contract: a backend is one class registered under its name, with its options (a Params model, the
study file's `backend` section) and its jobs: run trials until each has an outcome, say what it has running, stop
it, and clean up after a driver that was killed. run_trial is the same function on every backend."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import NonNegativeInt

from orch.methods.contracts.registry import Params, Registry
from orch.problems import Problem

if TYPE_CHECKING:
    from orch.execution.trial import Trial
    from orch.progress import Progress

DEFAULT_BACKEND = "ray"
JOB_FILE = "job.json"
"""<trial>/job.json: a backend whose trials run as jobs of their own records a trial's latest job there,
{"job_id": …, …}; `orch status` shows its live state (Backend.job_states)."""


class BackendParams(Params):
    """Options every backend has."""

    name: str = DEFAULT_BACKEND
    max_failures: NonNegativeInt = 1
    """Retries of a trial after an infrastructure failure (a Ray worker or a Slurm job that died without
    recording an outcome). An exception in the trial itself is a `failed` result and is not retried."""

    def workers(self) -> int:
        """Data-parallel workers of a trial that does not set train.workers (docs/parallel.md)."""
        return getattr(self, "workers_per_trial", 1)

    def trial_workers(self, config: dict) -> int:
        """Data-parallel workers of the trial with this resolved config: its train.workers, else the backend's."""
        return config["train"].get("workers") or self.workers()

    def workers_refused(self, workers: int) -> str | None:
        """Why this backend cannot run a trial on `workers` workers (None: it can)."""
        return None


class BackendError(Exception):
    """The backend's own tools (a scheduler's commands) are missing or failing."""


class Backend:
    """A place to run trials. Subclasses set `Params` and implement `run`; the rest have safe defaults.

    Capabilities:
        hosts_search: it can run a study's `search` block (through `search`).
        jobs_outlive_driver: its trials go on when the orch process stops (Slurm jobs): an interrupted driver
            leaves them running instead of marking them cancelled.
        live_job_states: the job states (of `job_states`) in which a job still runs or will run.
    """

    Params: ClassVar[type[BackendParams]] = BackendParams
    hosts_search: ClassVar[bool] = False
    jobs_outlive_driver: ClassVar[bool] = False
    live_job_states: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params: BackendParams):
        self.params = params

    def session(self, study_dir: Path) -> AbstractContextManager:
        """What a submission holds while it runs teachers, stages and trials (one Ray for all of them); nothing
        by default."""
        return nullcontext()

    def preflight(self, from_cli: bool) -> list[Problem]:
        """Problems with the surroundings (a cluster that does not answer), checked before anything is created."""
        return []

    def run(self, trials: list[Trial], study_dir: Path, study: str, progress: Progress, say: Callable) -> None:
        """Run the trials (run_trial on each) until every one has an outcome in its directory."""
        raise NotImplementedError

    def search(
        self, study, study_dir: Path, uri: str, experiment_id: str, parent_id: str, teachers: dict, say: Callable
    ) -> int:
        """Run a study's search block (`teachers`: teacher id → file, trained first); returns how many samples the
        backend itself could not run."""
        raise NotImplementedError

    def map(self, fn: Callable[[str], Any], items: list[str], study_dir: Path, study: str) -> list[Any]:
        """fn(item) for each item where this backend runs work, one task each with a trial's resources (`orch
        eval` evaluates trial directories so); the results in order. fn must pickle (a module-level function or
        a partial of one). Default: one after the other in this process."""
        return [fn(item) for item in items]

    def job_scripts(self, configs: list[dict], study_dir: Path, study: str) -> list[str]:
        """The scripts this backend would submit for trials of these resolved configs (`orch plan` shows them);
        [] for a backend that submits none."""
        return []

    def job_states(self, job_ids: list[str]) -> dict[str, str]:
        """Live states of this backend's jobs by id (for `orch status`); {} when it has none. Raises BackendError
        when they cannot be asked."""
        return {}

    def cancel(self, trial_dirs: list[Path], say: Callable) -> None:
        """Stop the work these (unfinished) trials have running outside the orch process, if any."""

    @classmethod
    def recover(cls, record: dict) -> None:
        """Clean up what a killed driver of this backend left (its driver record, driver.json, is given)."""


BACKENDS = Registry("backend")


def register_backend(name: str):
    """Register a Backend class under `name` with its Params as the options."""

    def decorator(cls: type[Backend]) -> type[Backend]:
        return BACKENDS.register(name, cls.Params)(cls)

    return decorator
