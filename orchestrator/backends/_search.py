"""Search: sample trials with Optuna (TPE), random or grid search through Ray Tune, optionally stopping poor ones
early with ASHA. Every sample is an ordinary orch trial (id = hash of its config, own directory, checkpoints and
MLflow child run), so an interrupted search resumes like a grid: Tune restores its searcher, orch its trials."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from orch.backends._ray_tune import (
    close_abandoned,
    run_on_workers,
    start_ray,
    stop_ray,
    tune_trial_resources,
    worker_options,
)
from orch.backends.search_space import Search, SpaceEntry
from orch.execution.processes import record_process
from orch.execution.trial import EarlyStopped, Trial, finish_detail, open_trial
from orch.methods.runtime.storage import exclusive
from orch.tracking.store import record_outcome
from orch.trial.config import resolve_trial_config, trial_id
from orch.trial.spec import TrialSpec, level_label, set_dotted
from orch.trial.state import WRITER_LOCK, TrialState
from orch.trial.status import FINISHED_STATES, STOPPED


@dataclass(frozen=True)
class SearchCell:
    """What every sample of one grid cell shares: where it lives and what it starts from."""

    study: str
    study_dir: str
    tracking_uri: str
    experiment_id: str
    parent_id: str
    config: dict
    factors: dict
    levels: dict
    metric: str
    generation: str
    teacher: str | None
    """The planned teacher trial every sample of the cell distils (search spaces cannot change it)."""
    guide: str | None
    """The planned weak teacher trial that autoguides it (likewise)."""
    stage: str | None
    """The planned prior stage trial it starts from (likewise)."""
    teachers: dict
    """Teacher trial id → its trained checkpoint file."""


def tune_domain(entry: SpaceEntry, algorithm: str):
    if algorithm == "grid":
        return tune.grid_search(entry.choice)
    if entry.loguniform is not None:
        return tune.loguniform(*entry.loguniform)
    if entry.uniform is not None:
        return tune.uniform(*entry.uniform)
    if entry.randint is not None:
        return tune.randint(*entry.randint)
    return tune.choice(entry.choice)


def sampled_trial(cell: SearchCell, params: dict) -> Trial:
    """The orch trial of one sample: same parameters → same trial (and run) as before an interruption."""
    config = copy.deepcopy(cell.config)
    for key, value in params.items():
        set_dotted(config, key, value)
    resolved, problems = resolve_trial_config(config)
    if problems:  # the study's validation checked the edges of every distribution, so this is a bug
        raise ValueError(f"sampled an invalid trial {params}: {'; '.join(map(str, problems))}")
    client = MlflowClient(cell.tracking_uri)
    levels = cell.levels | {k: (None, level_label(v)) for k, v in params.items()}  # a sample is its own group
    spec = TrialSpec(
        trial_id(resolved), resolved, {**cell.factors, **params}, levels, cell.teacher, cell.guide, cell.stage
    )
    trial, _ = open_trial(
        client,
        cell.experiment_id,
        cell.parent_id,
        cell.study,
        Path(cell.study_dir),
        spec,
        cell.generation,
        teachers=cell.teachers,
    )
    return trial


def report_result(cell: SearchCell, trial: Trial) -> None:
    state = TrialState.load(Path(trial.dir))
    if cell.metric in state.result:
        tune.report({"step": state.step, cell.metric: state.result[cell.metric], "orch_trial_id": trial.id})


def search_trainable(config: dict, cell: SearchCell, workers: dict) -> None:
    """Ray Tune function trainable of one sample: run (or resume) its orch trial, reporting the searched metric at
    every evaluation so the searcher and the scheduler see it, and its final value once the outcome is recorded.

    Tune stops a function trainable by raising SystemExit inside `tune.report` (and expects the thread to end
    then: reporting again would block it forever). Before the last step that means ASHA stopped the trial early.
    """
    record_process()
    trial = sampled_trial(cell, config["params"])
    if TrialState.load(Path(trial.dir)).status in FINISHED_STATES:  # replayed after a resume: never train again
        report_result(cell, trial)
        return
    steps = trial.config["train"]["steps"]

    def report(step: int, metrics: dict[str, float]) -> None:
        if cell.metric in metrics and step < steps:
            try:
                tune.report({"step": step, cell.metric: metrics[cell.metric], "orch_trial_id": trial.id})
            except SystemExit:
                raise EarlyStopped(f"stopped early by the scheduler after step {step}") from None

    if run_on_workers(trial, workers, report) == STOPPED:
        raise SystemExit(0)  # end the thread as Tune's stop intends (it must not report again), outcome recorded
    report_result(cell, trial)


def search_algorithm(search: Search, max_concurrent: int | None):
    if search.algorithm == "optuna":
        optuna = OptunaSearch(seed=search.seed)
        return ConcurrencyLimiter(optuna, max_concurrent) if max_concurrent else optuna
    return BasicVariantGenerator(random_state=search.seed, max_concurrent=max_concurrent or 0)


def settle_stopped(results, cell: SearchCell) -> None:
    """Record samples the scheduler stopped whose worker was torn down before it could write that down.

    Tune ends `fit` as soon as it has decided to stop a trial, while the trial's thread may still be recording
    its outcome, or be ended by its actor's exit before it could. Once the trial's writer lock is free (the
    thread is done, or its process gone), a sample Tune finished without error whose directory still says
    `running` was stopped at its last report: record that, as the worker would have."""
    client = MlflowClient(cell.tracking_uri)
    for result in results:
        trial_id = (result.metrics or {}).get("orch_trial_id")
        if result.error is not None or trial_id is None:
            continue
        trial_dir = Path(cell.study_dir) / "trials" / trial_id
        with exclusive(trial_dir / WRITER_LOCK):  # the thread has recorded its outcome, or its process is gone
            state = TrialState.load(trial_dir)
            if state.status in FINISHED_STATES:
                continue
            step = result.metrics["step"]
            state.status, state.step = STOPPED, step
            state.reason = f"stopped early by the scheduler after step {step}"
            state.result = {cell.metric: result.metrics[cell.metric]}
            state.save(trial_dir)
            record_outcome(client, state.run_id, state, trial_dir)


class SampleLines(tune.Callback):
    """One line per finished sample: its parameters, its last value of the searched metric and its outcome."""

    def __init__(self, label: str, cell: SearchCell, say):
        self.label, self.cell, self.say, self.count = label, cell, say, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.count += 1
        params = " ".join(f"{k.rsplit('.', 1)[-1]}={level_label(v)}" for k, v in trial.config["params"].items())
        result = trial.last_result or {}
        value = result.get(self.cell.metric)
        shown = f"{self.cell.metric}={value:.4g}" if isinstance(value, float) else "no evaluation"
        state = TrialState.load(Path(self.cell.study_dir) / "trials" / result.get("orch_trial_id", "?"))
        self.say(f"search {self.label}: sample {self.count} {params}: {shown} ({state.status})")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.count += 1
        sample = sampled_trial(self.cell, trial.config["params"])  # the same trial its worker opened
        close_abandoned(sample, trial)
        self.say(f"search {self.label}: sample {self.count} failed in Tune ({finish_detail(sample)[1]})")


def new_tuner(
    search: Search, cell: SearchCell, trainable, path: Path, max_concurrent: int | None, callback: SampleLines
) -> tune.Tuner:
    scheduler = None
    if search.scheduler is not None:
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=cell.config["train"]["steps"],
            grace_period=search.scheduler.grace_period,
            reduction_factor=search.scheduler.reduction_factor,
        )
    return tune.Tuner(
        trainable,
        param_space={"params": {k: tune_domain(e, search.algorithm) for k, e in search.space.items()}},
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=search.mode,
            num_samples=search.num_samples,
            search_alg=search_algorithm(search, max_concurrent),
            scheduler=scheduler,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=path.name,
            storage_path=str(path.parent),
            verbose=0,
            callbacks=[JsonLoggerCallback(), callback],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def run_search(
    study, study_dir: Path, uri: str, experiment_id: str, parent_id: str, backend, teachers: dict, say
) -> int:
    """One Tune experiment per grid cell, named by the cell's position so that a re-submission restores it.
    Returns the number of samples Tune could not run (errors outside orch's trials, e.g. a lost worker)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one INFO line per sample otherwise
    search = study.search
    errors = 0
    start_ray(backend.address, study_dir)
    try:
        for index, spec in enumerate(study.trials):
            cell = SearchCell(
                study.name,
                str(study_dir),
                uri,
                experiment_id,
                parent_id,
                spec.config,
                spec.factors,
                spec.levels,
                search.metric,
                study.generation,
                spec.teacher,
                spec.guide,
                spec.stage,
                teachers,
            )
            trainable = tune.with_resources(
                tune.with_parameters(search_trainable, cell=cell, workers=worker_options(backend)),
                tune_trial_resources(backend, backend.trial_workers(spec.config)),
            )
            path = (study_dir / "ray" / f"search-cell{index}").resolve()
            label = f"cell {index + 1}/{len(study.trials)}" + (f" {spec.label}" if spec.factors else "")
            if tune.Tuner.can_restore(path):
                say(f"search {label}: resuming from {path}")
                tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
            else:
                say(f"search {label}: {search.num_samples} samples, {search.algorithm}, {search.mode} {search.metric}")
                tuner = new_tuner(search, cell, trainable, path, backend.max_concurrent, SampleLines(label, cell, say))
            results = tuner.fit()
            for error in results.errors:
                errors += 1
                say(f"search {label}: a sample failed in Tune: {str(error).strip().splitlines()[-1]}")
            settle_stopped(results, cell)
    finally:
        stop_ray()
    return errors
