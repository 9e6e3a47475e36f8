"""The ray backend: trials as Ray Tune trials, on an embedded local Ray (loopback only) or an existing cluster;
it also hosts a study's search (Optuna through Tune). Ray is imported when the backend runs, not before."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from orch.backends.base import Backend, BackendParams, register_backend
from orch.methods.contracts.registry import Params
from orch.preflight import CONNECT_SECONDS, parse_address, reachable
from orch.problems import Problem
from orch.progress import Progress

if TYPE_CHECKING:
    from orch.execution.trial import Trial

ENVIRONMENT = {
    "RAY_AUTH_MODE": "disabled",  # to a cluster, as its users set it; the embedded Ray always has its own token
    "RAY_USAGE_STATS_ENABLED": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # orch logs to MLflow itself...
    "RAY_AIR_NEW_OUTPUT": "0",  # ...and prints its own progress (verbose=0 then is silent)
    "TUNE_DISABLE_SIGINT_HANDLER": "1",  # Ctrl-C interrupts orch, as SIGTERM does (exit 130)
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "60",  # with reuse_actors, a finished trial's last MLflow writes
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",  # progress results carry no searched metric
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "86400",  # a data-parallel trial queues for its workers like any
    "RAY_CHDIR_TO_TRIAL_DIR": "0",  # relative paths of a study (dataset.root, a VAE) mean what they mean to orch
}
"""Ray's and Tune's settings orch runs with (a user's own environment wins), set before Ray is imported."""


class Resources(Params):
    cpu: PositiveFloat = 1
    """CPUs Ray reserves per trial (torch's thread count is train.threads)."""
    gpu: Annotated[float, Field(ge=0)] = 0
    """GPUs Ray reserves per trial (fractions share one)."""


class RayParams(BackendParams):
    name: Literal["ray"] = "ray"
    max_concurrent: PositiveInt | None = None
    """Trials at once; null = as many as the resources allow."""
    resources: Resources = Resources()
    """Ray resources per trial (per worker of a data-parallel trial)."""
    workers_per_trial: PositiveInt = 1
    """Data-parallel workers per trial (docs/parallel.md; a trial's train.workers overrides it): more than 1 runs
    each trial as a Ray Train
    TorchTrainer inside the study's Tune run, each worker taking train.batch_size / workers of every batch and
    `resources` (gloo on CPU, NCCL on GPUs)."""
    address: str | None = None
    """An existing Ray cluster (e.g. "ray://head:10001", "head:6379" or "auto"); null starts an embedded local Ray
    on 127.0.0.1."""

    @field_validator("address")
    @classmethod
    def ray_address(cls, address: str | None) -> str | None:
        if address is not None:
            parse_address(address)
        return address


def ray_environment() -> None:
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)


@register_backend("ray")
class Ray(Backend):
    """Ray Tune trials: a grid as one Tune run, a search as one Tune run per grid cell."""

    Params = RayParams
    hosts_search = True

    def preflight(self, from_cli: bool) -> list[Problem]:
        """A cluster named by address must answer within CONNECT_SECONDS."""
        address, where = self.params.address, "--ray-address" if from_cli else "backend.address"
        target = parse_address(address) if address else None
        if target is not None and (why := reachable(*target)):
            return [Problem(where, f"no Ray cluster answers at {address} within {CONNECT_SECONDS:.0f} s ({why})")]
        return []

    def session(self, study_dir: Path) -> AbstractContextManager:
        """One Ray start for the submission's teachers, stages and trials."""
        ray_environment()
        from orch.backends._ray_tune import hold_ray

        return hold_ray(study_dir)

    def run(self, trials: list[Trial], study_dir: Path, study: str, progress: Progress, say: Callable) -> None:
        ray_environment()
        from orch.backends._ray_tune import run_grid

        run_grid(trials, study_dir, self.params, progress)

    def search(
        self, study, study_dir: Path, uri: str, experiment_id: str, parent_id: str, teachers: dict, say: Callable
    ) -> int:
        ray_environment()
        from orch.backends._search import run_search

        return run_search(study, study_dir, uri, experiment_id, parent_id, self.params, teachers, say)

    def map(self, fn: Callable[[str], Any], items: list[str], study_dir: Path, study: str) -> list[Any]:
        """One Ray task per item with backend.resources (max_concurrent aside: Ray packs them by resources)."""
        ray_environment()
        from orch.backends._ray_tune import map_tasks

        return map_tasks(fn, items, study_dir, self.params)

    @classmethod
    def recover(cls, record: dict) -> None:
        """Remove a killed driver's embedded Ray session files (the driver has killed its recorded processes)."""
        if temp_dir := record.get("ray_temp_dir"):
            shutil.rmtree(temp_dir, ignore_errors=True)
