"""Where run_trial executes: in this process (`local`) or as Ray Tune trials (`ray`, embedded or a cluster)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes a token under ~/.ray
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # orch logs to MLflow itself...
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # ...and prints its own progress (verbose=0 then is silent)

import ray  # noqa: E402 — after the environment it reads
from ray import tune  # noqa: E402
from ray.tune.logger import JsonLoggerCallback  # noqa: E402

from orchestrator.runner import Trial, run_trial
from orchestrator.state import FAILED, TrialState

Say = Callable[[str], None]


def run_local(trials: list[Trial], say: Say) -> None:
    """Sequentially, in-process: for debugging, and the baseline of the overhead benchmark."""
    for i, trial in enumerate(trials, 1):
        say(f"[{i}/{len(trials)}] {trial.label} ({trial.id}) started")
        try:
            status = run_trial(trial, progress=lambda m, t=trial: say(progress_line(t, m)))
        except Exception as e:  # recorded as failed in the trial dir and MLflow; the study goes on
            status = f"{FAILED}: {type(e).__name__}: {e}"
        say(f"[{i}/{len(trials)}] {trial.label} ({trial.id}) {status}")


def progress_line(trial: Trial, metrics: dict) -> str:
    scores = " ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in metrics.items() if k != "step")
    return f"    {trial.label} step {metrics['step']}: {scores}"


def ray_trainable(config: dict) -> None:
    """Ray Tune function trainable: loads the trial from its directory and runs it."""
    trial = Trial.load(config["trial_dir"])
    status = run_trial(trial, progress=lambda m: tune.report({"step": m["step"], "orch_scores": json.dumps(m)}))
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
    trials: list[Trial], study_dir: Path, resources: dict, max_concurrent: int | None, address: str | None, say: Say
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
                callbacks=[ProgressCallback(by_dir, say), JsonLoggerCallback()],  # Tune's result.json: resume needs it
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        tuner.fit()
    finally:
        ray.shutdown()


class ProgressCallback(tune.Callback):
    """Plain progress lines from the driver: trial started, evaluation scores, final status."""

    def __init__(self, trials: dict[str, Trial], say: Say):
        self.trials, self.say, self.done = trials, say, 0

    def _trial(self, tune_trial) -> Trial:
        return self.trials[tune_trial.config["trial_dir"]]

    def on_trial_start(self, iteration, trials, trial, **info):
        t = self._trial(trial)
        self.say(f"[{self.done}/{len(self.trials)} done] {t.label} ({t.id}) started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "orch_scores" in result:
            self.say(progress_line(self._trial(trial), json.loads(result["orch_scores"])))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trial)

    def _finished(self, tune_trial) -> None:
        self.done += 1
        t = self._trial(tune_trial)
        state = TrialState.load(Path(t.dir))
        detail = f": {state.reason.strip().splitlines()[-1]}" if state.reason else ""
        self.say(f"[{self.done}/{len(self.trials)} done] {t.label} ({t.id}) {state.status}{detail}")


def say_plain(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
