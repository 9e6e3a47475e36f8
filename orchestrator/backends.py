"""Where run_trial executes: in this process (`local`) or as Ray Tune trials (`ray`, embedded or a cluster)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes a token under ~/.ray
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # orch logs to MLflow itself...
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # ...and prints its own progress (verbose=0 then is silent)

import ray  # noqa: E402 — after the environment it reads
from ray import tune  # noqa: E402
from ray.tune.logger import JsonLoggerCallback  # noqa: E402

from orchestrator.progress import Progress
from orchestrator.runner import Trial, run_trial
from orchestrator.state import TrialState


def finish_detail(trial: Trial) -> tuple[str, str]:
    """(status, last line of the reason) from the trial directory, the source of truth."""
    state = TrialState.load(Path(trial.dir))
    return state.status, state.reason.strip().splitlines()[-1] if state.reason else ""


def run_local(trials: list[Trial], progress: Progress) -> None:
    """Sequentially, in the `orch` process: for debugging, or where no Ray is wanted."""
    for trial in trials:
        progress.started(trial.id, TrialState.load(Path(trial.dir)).step)
        try:
            run_trial(trial, progress=lambda step, metrics, t=trial: progress.update(t.id, step, metrics))
        except Exception:  # recorded as failed in the trial dir and MLflow; the study goes on
            pass
        progress.finished(trial.id, *finish_detail(trial))


def ray_trainable(config: dict) -> None:
    """Ray Tune function trainable: loads the trial from its directory and runs it."""
    trial = Trial.load(config["trial_dir"])
    status = run_trial(trial, progress=lambda step, m: tune.report({"step": step, "orch_metrics": json.dumps(m)}))
    tune.report({"orch_status": status})


def start_ray(address: str | None, temp_dir: Path) -> None:
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return
    # Workers import run_trial from this interpreter's environment: make the project importable for them.
    root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH")] if p)
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        _temp_dir=str(temp_dir),
    )


def run_ray(
    trials: list[Trial],
    study_dir: Path,
    resources: dict,
    max_concurrent: int | None,
    address: str | None,
    progress: Progress,
) -> None:
    """All trials as one Ray Tune run: a grid over trial directories, `reuse_actors` to avoid re-importing torch."""
    # Unix socket paths must stay short (~100 bytes), so Ray's session files go under /tmp.
    start_ray(address, Path("/tmp") / f"orch-ray-{os.getpid()}")
    try:
        trainable = tune.with_resources(ray_trainable, {"cpu": resources["cpu"], "gpu": resources["gpu"]})
        by_dir = {t.dir: t for t in trials}
        tuner = tune.Tuner(
            trainable,
            param_space={"trial_dir": tune.grid_search([t.dir for t in trials])},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str((study_dir / "ray").resolve()),
                verbose=0,
                callbacks=[
                    ProgressCallback(by_dir, progress),
                    JsonLoggerCallback(),
                ],  # Tune's result.json: resume needs it
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        tuner.fit()
    finally:
        ray.shutdown()


class ProgressCallback(tune.Callback):
    """Feeds Tune's trial events into orch's progress view."""

    def __init__(self, trials: dict[str, Trial], progress: Progress):
        self.trials, self.progress = trials, progress

    def _trial(self, tune_trial) -> Trial:
        return self.trials[tune_trial.config["trial_dir"]]

    def on_trial_start(self, iteration, trials, trial, **info):
        t = self._trial(trial)
        self.progress.started(t.id, TrialState.load(Path(t.dir)).step)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "orch_metrics" in result:
            self.progress.update(self._trial(trial).id, result["step"], json.loads(result["orch_metrics"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        t = self._trial(trial)
        self.progress.finished(t.id, *finish_detail(t))

    def on_trial_error(self, iteration, trials, trial, **info):
        t = self._trial(trial)
        self.progress.finished(t.id, *finish_detail(t))


def say_plain(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
