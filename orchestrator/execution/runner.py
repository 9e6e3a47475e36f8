"""run_trial: the one function every backend executes. Builds a trial from registries, trains, evaluates,
checkpoints into the trial directory and logs to the trial's MLflow run; resumes from the directory."""

from __future__ import annotations

import json
import logging
import os
import traceback
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from orch.execution.build import build_trainer
from orch.execution.loop import training_loop
from orch.execution.records import Recorder, TrialTracker, finish, keep_best, notes_recorded, record_previews
from orch.execution.teachers import load_teacher
from orch.execution.trial import EarlyStopped, Progress, Trial
from orch.methods.contracts.guidance import num_classes_of
from orch.methods.runtime.parallel import world_of
from orch.methods.runtime.storage import exclusive
from orch.methods.training.trainer import Diverged, Trainer, reset_peak_memory, resolve_device
from orch.tracking.schema import CLASSES, GUIDE, PRECISION, STAGE, TEACHER, TRIAL_DIR, eval_key
from orch.tracking.store import environment_tags, log_batch, mark_running, measure_tags
from orch.trial.config import metric_fingerprint
from orch.trial.state import WRITER_LOCK, TrialState, load_latest_checkpoint
from orch.trial.status import COMPLETED, DIVERGED, FAILED, FINISHED_STATES, RUNNING, STOPPED

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """This process's Slurm job id (array tasks as ARRAYID_TASK, as squeue shows them), or None outside Slurm."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {torch.get_num_threads()} thread(s) of {os.cpu_count()}"


def prepare_trainer(trial: Trial, device: torch.device) -> tuple[Trainer, dict[str, str], float]:
    """The trial's trainer (with its teacher when the method distils), restored from the newest checkpoint; the
    run's tags; and the wall time already spent before that checkpoint."""
    tags = environment_tags(device_name(device)) | {TRIAL_DIR: trial.dir}
    teacher = guide = stage = None
    if trial.teacher is not None:  # planned and trained first by the driver, or named by the study
        teacher, _ = load_teacher(trial.teacher, trial.config)
        tags[TEACHER] = trial.teacher_name
    if trial.guide is not None:  # autoguidance's weak teacher, likewise
        guide, _ = load_teacher(trial.guide, trial.config)
        tags[GUIDE] = trial.guide
    if trial.stage is not None:  # the prior stage it starts from, likewise
        stage, _ = load_teacher(trial.stage)
        tags[STAGE] = trial.stage
    trainer = build_trainer(trial.parsed, device, teacher, guide, stage)
    tags[PRECISION] = trainer.precision + ("+compile" if trainer.cfg.compile else "")
    if (classes := getattr(trainer.dataset, "classes", None)) is not None:  # the class list of the run's labels
        tags[CLASSES] = json.dumps(classes)
    checkpoint = load_latest_checkpoint(Path(trial.dir))
    if checkpoint is None:
        return trainer, tags, 0.0
    trainer.load_state_dict(checkpoint["trainer"])
    return trainer, tags, checkpoint["wall_seconds"]


def run_trial(trial: Trial, progress: Progress | None = None) -> str:
    """Train one trial to the end (or to divergence) and return its final status.

    Idempotent: a finished trial returns at once; an interrupted one continues from its newest checkpoint in
    the same MLflow run, so at most the steps since that checkpoint are replayed (and not logged again). A
    failure of the trial itself is recorded as `failed` with its traceback and returned, never raised; only an
    interruption (Ctrl-C, SIGTERM, a worker torn down) leaves the trial `running` for a resume.
    """
    trial_dir = Path(trial.dir)
    if world_of()[0] != 0:  # a data-parallel rank other than 0 trains in step with rank 0 and records nothing
        return follow_trial(trial, TrialState.load(trial_dir))
    with exclusive(trial_dir / WRITER_LOCK):  # a killed holder's lock is taken over
        state = TrialState.load(trial_dir)  # as the previous writer left it
        if state.status in FINISHED_STATES and not missing_evaluations(trial.config, state):
            return state.status
        with notes_recorded(state, progress):
            if state.status in FINISHED_STATES:
                return evaluate_final(trial, state, progress)
            return train_trial(trial, state, progress)


def trial_device(trial: Trial) -> torch.device:
    """The trial's device (and torch's threads, set as its train section asks)."""
    if trial.parsed.train.threads is not None:
        torch.set_num_threads(trial.parsed.train.threads)
    return resolve_device(trial.parsed.train.device)


def follow_trial(trial: Trial, state: TrialState) -> str:
    """A data-parallel rank other than 0: the training loop from the same checkpoint as rank 0, recording
    nothing; the trial's status is what rank 0 recorded."""
    if state.status in FINISHED_STATES:
        return state.status
    trainer, _, _ = prepare_trainer(trial, trial_device(trial))
    training_loop(trainer, trial.parsed.train, trial.parsed.eval, None)
    return TrialState.load(Path(trial.dir)).status


def train_trial(trial: Trial, state: TrialState, progress: Progress | None) -> str:
    """Rank 0 (or the only rank): the training loop with its records; the outcome in state.json and MLflow."""
    device = trial_device(trial)
    client = MlflowClient(trial.tracking_uri)
    tracker = TrialTracker(client, trial, log.warning)
    try:
        trainer, tags, wall_before = prepare_trainer(trial, device)
    except Exception:  # e.g. an unreadable teacher: the trial fails with its reason, the study goes on
        return finish(tracker, state, FAILED, traceback.format_exc(limit=20))
    tracker.call(lambda: mark_running(client, trial.run_id, tags))
    tracker.confirm(state)
    state.status, state.step, state.reason, state.job_id = RUNNING, trainer.step, None, slurm_job_id()
    state.save(Path(trial.dir))
    reset_peak_memory(device)
    try:
        training_loop(
            trainer,
            trial.parsed.train,
            trial.parsed.eval,
            Recorder(trial, state, tracker, trainer, wall_before, progress),
        )
        state.fingerprints = {m: metric_fingerprint(m, trial.config) for m in trial.parsed.eval.metrics}
        return finish(tracker, state, COMPLETED, None)
    except Diverged as e:
        tracker.flush(state)
        return finish(tracker, state, DIVERGED, e.reason, step=e.step)
    except EarlyStopped as e:
        tracker.flush(state)
        return finish(tracker, state, STOPPED, str(e), step=trainer.step)
    except Exception:  # the trial's own failure: a result with its traceback, the study goes on
        reason = traceback.format_exc(limit=20)
        tracker.flush(state)
        return finish(tracker, state, FAILED, reason)


def missing_evaluations(config: dict, state: TrialState) -> dict[str, list[int]]:
    """metric → the step counts the trial's eval config asks for that its final checkpoint was not evaluated at,
    for a completed trial whose metric fingerprint is unchanged (a changed one is reported by the driver)."""
    if state.status != COMPLETED:
        return {}
    missing = {}
    for metric in config["eval"]["metrics"]:
        if state.fingerprints.get(metric, metric_fingerprint(metric, config)) != metric_fingerprint(metric, config):
            continue
        nfes = [
            n
            for n in config["eval"]["nfe"]
            if any(eval_key(metric, n, w) not in state.result for w in config["eval"]["guidance"])
        ]
        if nfes:
            missing[metric] = nfes
    return missing


def evaluate_final(trial: Trial, state: TrialState, progress: Progress | None) -> str:
    """Evaluate a completed trial's final checkpoint where its eval config asks for more than it measured (a new
    metric or step count): the new values are logged at the final step; nothing trains."""
    trial_dir, missing = Path(trial.dir), missing_evaluations(trial.config, state)
    device = trial_device(trial)
    tracker = TrialTracker(MlflowClient(trial.tracking_uri), trial, log.warning)
    checkpoint = load_latest_checkpoint(trial_dir)
    if checkpoint is None:
        log.warning("trial %s: no readable checkpoint to evaluate %s at; the evaluation is skipped", trial.id, missing)
        return state.status
    trainer = build_trainer(trial.parsed, device)  # sampling needs no teacher
    trainer.load_state_dict(checkpoint["trainer"])
    evaluation = trial.parsed.eval
    net = trainer.ema.nets[evaluation.ema if evaluation.ema is not None else trainer.cfg.ema[0]]
    for metric, nfes in missing.items():
        scores, previews = trainer.evaluate(evaluation.model_copy(update={"metrics": [metric], "nfe": nfes}))
        tracker.add(scores, trainer.step, state, replayed=False)
        keep_best(trial_dir, trainer.step, scores, net)
        record_previews(tracker, trainer.step, previews, num_classes_of(trainer.dataset))
        state.result |= scores
        state.fingerprints[metric] = metric_fingerprint(metric, trial.config)
        if progress:
            progress(trainer.step, scores)
    tags = measure_tags(trial.config, list(state.fingerprints))
    tracker.call(lambda: log_batch(tracker.client, trial.run_id, tags=tags))
    tracker.flush(state)
    state.save(trial_dir)
    return state.status
