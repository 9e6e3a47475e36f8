"""run_trial: the one function every backend executes. Builds a trial from registries, trains, evaluates,
checkpoints into the trial directory and logs to the trial's MLflow run; resumes from the directory."""

from __future__ import annotations

import io
import json
import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from methods.training import Diverged, EvalConfig, TrainConfig, Trainer, reset_peak_memory, resolve_device
from orchestrator import teachers
from orchestrator.build import build_trainer, needs_teacher
from orchestrator.state import (
    CANCELLED,
    COMPLETED,
    DIVERGED,
    FAILED,
    FINISHED_STATES,
    RUNNING,
    STOPPED,
    TrialState,
    atomic_write_bytes,
    load_latest_checkpoint,
    save_checkpoint,
    write_json,
)
from orchestrator.tracking import STATUS, ensure_trial_run, environment_tags, log_batch


class EarlyStopped(Exception):
    """Raised from a progress callback when a search scheduler stops the trial: recorded as `stopped`."""


Progress = Callable[[int, dict[str, float]], None]
"""Called with (step, metrics) at every log tick and evaluation."""


@dataclass(frozen=True)
class Trial:
    """Everything a worker needs to run one trial; written to <trial dir>/trial.json by the driver."""

    id: str
    study: str
    label: str
    config: dict
    factors: dict
    dir: str
    tracking_uri: str
    run_id: str

    def save(self) -> None:
        write_json(Path(self.dir) / "trial.json", asdict(self))

    @classmethod
    def load(cls, trial_dir: str | Path) -> Trial:
        return cls(**json.loads((Path(trial_dir) / "trial.json").read_text()))


def open_trial(
    client: MlflowClient,
    experiment_id: str,
    parent_id: str,
    study: str,
    study_dir: Path,
    spec_id: str,
    label: str,
    config: dict,
    factors: dict,
) -> tuple[Trial, TrialState]:
    """A trial's directory, state and MLflow child run: created on first use, the same ones ever after (the run
    recorded in state.json, else the one tagged with the trial id), with trial.json written for the workers."""
    trial_dir = study_dir / "trials" / spec_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    state = TrialState.load(trial_dir)
    run_id = ensure_trial_run(client, experiment_id, parent_id, spec_id, label, config, state.run_id)
    if state.run_id != run_id:
        state.run_id = run_id
        state.save(trial_dir)
    trial = Trial(spec_id, study, label, config, factors, str(trial_dir), client.tracking_uri, run_id)
    trial.save()
    return trial, state


def slurm_job_id() -> str | None:
    """This process's Slurm job id (array tasks as ARRAYID_TASK, as squeue shows them), or None outside Slurm."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def finish_detail(trial: Trial) -> tuple[str, str]:
    """(status, last line of the reason) from the trial directory, the source of truth."""
    state = TrialState.load(Path(trial.dir))
    return state.status, state.reason.strip().splitlines()[-1] if state.reason else ""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {torch.get_num_threads()} thread(s) of {os.cpu_count()}"


class MetricBuffer:
    """Collects metrics between checkpoints and writes them in one MLflow batch."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id, self.rows = client, run_id, []

    def add(self, metrics: dict[str, float], step: int) -> None:
        self.rows += [(k, v, step) for k, v in metrics.items()]

    def flush(self) -> None:
        if self.rows:
            log_batch(self.client, self.run_id, metrics=self.rows)
            self.rows = []


def prepare_trainer(trial: Trial, device: torch.device) -> tuple[Trainer, dict[str, str], float]:
    """The trial's trainer (with its teacher when the method distils), restored from the newest checkpoint; the
    run's tags; and the wall time already spent before that checkpoint."""
    tags = {STATUS: RUNNING} | environment_tags(device_name(device))
    teacher = None
    if needs_teacher(trial.config["method"]):
        workdir = Path(trial.dir).parents[2]
        teacher, tags["orch.teacher"] = teachers.obtain_teacher(trial.config, workdir, trial.tracking_uri)
    trainer = build_trainer(trial.config, device, teacher)
    checkpoint = load_latest_checkpoint(Path(trial.dir))
    if checkpoint is None:
        return trainer, tags, 0.0
    trainer.load_state_dict(checkpoint["trainer"])
    return trainer, tags, checkpoint["wall_seconds"]


def run_trial(trial: Trial, progress: Progress | None = None) -> str:
    """Train one trial to the end (or to divergence) and return its final status.

    Idempotent: a finished trial returns at once; an interrupted one continues from its newest checkpoint in
    the same MLflow run, so at most the steps since that checkpoint are replayed.
    """
    trial_dir = Path(trial.dir)
    state = TrialState.load(trial_dir)
    if state.status in FINISHED_STATES:
        return state.status
    train, evaluation = (
        TrainConfig.model_validate(trial.config["train"]),
        EvalConfig.model_validate(trial.config["eval"]),
    )
    if train.threads is not None:
        torch.set_num_threads(train.threads)
    device = resolve_device(train.device)
    client = MlflowClient(trial.tracking_uri)
    try:
        trainer, tags, wall_before = prepare_trainer(trial, device)
    except Exception:  # e.g. an unreadable teacher: the trial fails with its reason, the study goes on
        finish(client, trial, state, FAILED, traceback.format_exc(limit=20))
        raise
    client.update_run(trial.run_id, status="RUNNING")
    log_batch(client, trial.run_id, tags=tags)
    state = TrialState(RUNNING, trainer.step, trial.run_id, job_id=slurm_job_id())
    state.save(trial_dir)
    reset_peak_memory(device)
    metrics = MetricBuffer(client, trial.run_id)
    started = time.perf_counter()
    ema = evaluation.ema if evaluation.ema is not None else train.ema[0]

    def elapsed() -> float:
        return wall_before + time.perf_counter() - started

    try:
        while trainer.step < train.steps:
            last = trainer.step + 1 == train.steps
            stats = trainer.train_step(with_stats=(trainer.step + 1) % train.log_every == 0 or last)
            step = trainer.step
            if len(stats) > 1:
                metrics.add(stats | trainer.cost() | {"cost/device_hours": elapsed() / 3600}, step)
                if progress:
                    progress(step, {"train/loss": stats["train/loss"]})
            if step % evaluation.every == 0 or last:
                scores, grids = trainer.evaluate(evaluation)
                metrics.add(scores, step)
                keep_best(trial_dir, step, scores, trainer.ema.nets[ema])
                log_sample_grids(client, trial.run_id, step, grids)
                state.result = scores
                if progress:
                    progress(step, scores)
            if step % train.checkpoint_every == 0 or last:
                metrics.flush()  # metrics first: a resumed trial never lacks steps its checkpoint covers
                save_checkpoint(
                    trial_dir,
                    step,
                    {"trainer": trainer.state_dict(), "wall_seconds": elapsed()},
                    train.keep_checkpoints,
                )
                state.step = step
                state.save(trial_dir)
        finish(client, trial, state, COMPLETED, None)
    except Diverged as e:
        metrics.flush()
        finish(client, trial, state, DIVERGED, e.reason, step=e.step)
    except EarlyStopped as e:
        metrics.flush()
        finish(client, trial, state, STOPPED, str(e), step=trainer.step)
    except Exception:
        metrics.flush()
        finish(client, trial, state, FAILED, traceback.format_exc(limit=20))
        raise
    return state.status


def keep_best(trial_dir: Path, step: int, scores: dict[str, float], net: torch.nn.Module) -> None:
    """Keep the best EMA weights per metric and NFE (paper A reports each NFE at its best checkpoint) in
    <trial>/best/<metric>_nfe_<N>.pt, indexed by best/best.json ({key: {value, step}}); lower is better."""
    index_path = trial_dir / "best" / "best.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    improved = {
        key: value
        for key, value in scores.items()
        if math.isfinite(value) and (key not in index or value < index[key]["value"])
    }
    for key, value in improved.items():
        name = key.removeprefix("eval/").replace("/", "_")
        buffer = io.BytesIO()
        torch.save({"net": net.state_dict(), "step": step, "metric": key, "value": value}, buffer)
        atomic_write_bytes(trial_dir / "best" / f"{name}.pt", buffer.getvalue())
        index[key] = {"value": value, "step": step}
    if improved:
        write_json(index_path, index)


def log_sample_grids(client: MlflowClient, run_id: str, step: int, grids: dict[int, torch.Tensor]) -> None:
    """One PNG grid of generated images per NFE: artifacts samples/nfe_<N>/step_<step>.png."""
    from torchvision.utils import make_grid

    for nfe, images in grids.items():
        grid = make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=2, pad_value=255)
        client.log_image(run_id, grid.permute(1, 2, 0).numpy(), f"samples/nfe_{nfe}/step_{step:08d}.png")


def finish(
    client: MlflowClient, trial: Trial, state: TrialState, status: str, reason: str | None, step: int | None = None
) -> None:
    """Record the outcome in state.json first (the source of truth), then in MLflow."""
    state.status, state.reason = status, reason
    if step is not None:
        state.step = step
    state.save(Path(trial.dir))
    record_outcome(client, trial.run_id, state)


def record_outcome(client: MlflowClient, run_id: str, state: TrialState) -> None:
    """Write a trial's outcome (status, reason, step) from its state into its MLflow run and end the run; a
    failure's whole traceback also goes in as the artifact failure/traceback.txt."""
    tags = {STATUS: state.status}
    if state.reason is not None:
        tags |= {"orch.reason": state.reason[-5000:], "orch.stopped_step": str(state.step)}
    log_batch(client, run_id, tags=tags)
    if state.status == FAILED and state.reason:
        client.log_text(run_id, state.reason, "failure/traceback.txt")
    client.set_terminated(run_id, status={FAILED: "FAILED", CANCELLED: "KILLED"}.get(state.status, "FINISHED"))
