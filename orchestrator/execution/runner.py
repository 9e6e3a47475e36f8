"""run_trial: the one function every backend executes. Builds a trial from registries, trains, evaluates,
checkpoints into the trial directory and logs to the trial's MLflow run; resumes from the directory."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from orch.execution.build import build_trainer
from orch.execution.loop import training_loop
from orch.execution.teachers import load_teacher
from orch.methods.contracts.guidance import num_classes_of
from orch.methods.evaluation.metric import metric as metric_spec
from orch.methods.runtime.parallel import world_of
from orch.methods.runtime.storage import exclusive
from orch.methods.training.trainer import Diverged, Trainer, reset_peak_memory, resolve_device
from orch.tracking.schema import (
    CLASSES,
    FACTORS,
    GENERATION,
    PRECISION,
    REASON,
    STATUS,
    STOPPED_STEP,
    TEACHER,
    TRAIN_LOSS,
    TRIAL_DIR,
    TRIAL_ID,
    cost_key,
    eval_key,
    is_eval_key,
    parse_eval_key,
)
from orch.tracking.store import (
    TRACKING_ERRORS,
    ensure_trial_run,
    environment_tags,
    find_runs,
    log_batch,
    mark_running,
    measure_tags,
    not_yet_logged,
    record_outcome,
    replay_run,
)
from orch.trial.config import metric_fingerprint
from orch.trial.spec import TrialSpec
from orch.trial.state import (
    WRITER_LOCK,
    TrialState,
    append_metrics,
    atomic_write_bytes,
    load_latest_checkpoint,
    newest_checkpoint_step,
    read_json,
    read_metrics,
    save_checkpoint,
    write_json,
)
from orch.trial.status import COMPLETED, DIVERGED, FAILED, FINISHED_STATES, PENDING, RUNNING, STOPPED, UNREADABLE
from orch.trial.typed import TrialConfig

log = logging.getLogger(__name__)


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
    generation: str = ""
    """The version of the study file that last planned this trial (`orch status` shows the current one's)."""
    teacher: str | None = None
    """The teacher it distils: a planned teacher's file, or the file or trial directory the study names."""
    teacher_name: str | None = None
    """How its run names that teacher (tag orch.teacher): the planned teacher's id, or the named path."""

    @cached_property
    def parsed(self) -> TrialConfig:
        """Its config, typed: parsed once in each process that runs the trial."""
        return TrialConfig.parse(self.config)

    def __getstate__(self) -> dict:  # sent to a worker without its parsed config: the worker parses its own
        return {k: v for k, v in self.__dict__.items() if k != "parsed"}

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
    spec: TrialSpec,
    generation: str,
    say: Callable[[str], None] = log.warning,
    teachers: dict[str, Path] | None = None,
) -> tuple[Trial, TrialState]:
    """A trial's directory, state and MLflow child run: created on first use, the same ones ever after (the run
    recorded in state.json, else the one tagged with the trial id), with trial.json written for the workers and
    the run tagged with the trial's factor levels and the study version that planned it.

    The trial directory is the source of truth: an unreadable state.json is re-derived from the MLflow run and
    the checkpoints, and a run that is missing from the store (a lost or replaced store) is rebuilt from the
    directory's metrics log and state; both are said."""
    trial_dir = study_dir / "trials" / spec.id
    trial_dir.mkdir(parents=True, exist_ok=True)
    state = TrialState.load(trial_dir)
    if state.status == UNREADABLE:
        state, how = rederive_state(client, experiment_id, spec.id, trial_dir, spec.config["train"]["steps"])
        say(f"trial {spec.id}: {state.reason or 'state.json was unreadable'}; {how}")
        state.reason = None
        state.save(trial_dir)
    run_id = ensure_trial_run(client, experiment_id, parent_id, spec.id, spec.label, spec.config, state.run_id)
    if state.run_id != run_id:
        if state.run_id is not None:
            replay_run(client, run_id, trial_dir, state)
            say(f"trial {spec.id}: its MLflow run {state.run_id} is not in the store; rebuilt from {trial_dir}")
        state.run_id = run_id
        state.save(trial_dir)
    log_batch(client, run_id, tags={FACTORS: json.dumps(spec.levels), GENERATION: generation})
    named = spec.config["method"].get("teacher", {}).get("path") if isinstance(spec.config["method"], dict) else None
    planned = (teachers or {}).get(spec.teacher) if spec.teacher is not None else None
    teacher, teacher_name = (str(planned), spec.teacher) if planned else (named, named)
    trial = Trial(
        spec.id,
        study,
        spec.label,
        spec.config,
        spec.factors,
        str(trial_dir),
        client.tracking_uri,
        run_id,
        generation,
        teacher,
        teacher_name,
    )
    trial.save()
    return trial, state


def rederive_state(
    client: MlflowClient, experiment_id: str, trial_id: str, trial_dir: Path, steps: int
) -> tuple[TrialState, str]:
    """A trial's state rebuilt from what else records it: its MLflow run's outcome when the run finished, else
    its newest checkpoint (a resume continues from there). Returns the state and how it was obtained."""
    broken = TrialState.load(trial_dir).reason
    runs = find_runs(client, experiment_id, f"tags.`{TRIAL_ID}` = '{trial_id}'")
    logged = max((s for _, _, s in read_metrics(trial_dir)), default=-1)
    run = runs[0] if runs else None
    outcome = run.data.tags.get(STATUS) if run else None
    if run is not None and outcome in FINISHED_STATES:
        step = int(run.data.tags.get(STOPPED_STEP, steps))
        result = {k: v for k, v in run.data.metrics.items() if is_eval_key(k)}
        state = TrialState(outcome, step, run.info.run_id, run.data.tags.get(REASON), result, logged_step=logged)
        return state, f"re-derived from its MLflow run: {outcome} at step {step}, not run again"
    step = newest_checkpoint_step(trial_dir)
    state = TrialState(PENDING, step, run.info.run_id if run else None, broken, logged_step=logged)
    return state, f"re-derived from its checkpoints: it continues from step {step}" if step else "it runs again"


def slurm_job_id() -> str | None:
    """This process's Slurm job id (array tasks as ARRAYID_TASK, as squeue shows them), or None outside Slurm."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def finish_detail(trial: Trial) -> tuple[str, str, list[str]]:
    """(status, last line of the reason, warnings) from the trial directory, the source of truth."""
    state = TrialState.load(Path(trial.dir))
    return state.status, state.reason.strip().splitlines()[-1] if state.reason else "", state.warnings


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {torch.get_num_threads()} thread(s) of {os.cpu_count()}"


class TrialTracker:
    """A trial's writes to its MLflow run, behind the trial directory: metrics go to <trial>/metrics.jsonl first
    (MLflow's copy can be rebuilt from it), and a tracking store that fails is reported once and then left
    alone, so that it never turns a trained trial into a failed one."""

    def __init__(self, client: MlflowClient, trial: Trial, warn: Callable[[str], None]):
        self.client, self.trial, self.warn = client, trial, warn
        self.rows: list[tuple[str, float, int]] = []
        self.broken: str | None = None

    def call(self, write: Callable[[], None]) -> None:
        if self.broken is not None:
            return
        try:
            write()
        except TRACKING_ERRORS as e:
            self.broken = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            self.warn(
                f"MLflow tracking failed ({self.broken}); the trial goes on and keeps its results in "
                f"{self.trial.dir}: `orch resume` rebuilds its run"
            )

    def confirm(self, state: TrialState) -> None:
        """Before a resumed trial replays its steps: rows of the metrics log past state.logged_step, written by a
        trial interrupted between its two writes (the log, then MLflow) or before it recorded them as logged,
        go to MLflow unless it holds them already; then they count as logged, so that a replayed step is
        logged neither twice nor not at all."""
        rows = [row for row in read_metrics(Path(self.trial.dir)) if row[2] > state.logged_step]
        if not rows:
            return
        self.call(
            lambda: log_batch(
                self.client, self.trial.run_id, metrics=not_yet_logged(self.client, self.trial.run_id, rows)
            )
        )
        if self.broken is None:
            state.logged_step = max(step for _, _, step in rows)
            state.save(Path(self.trial.dir))

    def add(self, metrics: dict[str, float], step: int, state: TrialState, replayed: bool = True) -> None:
        """Queue metrics of `step`, unless a resumed trial replays a step whose metrics are logged already (new
        metrics of a logged step, as a later evaluation adds, pass `replayed=False`)."""
        if step > state.logged_step or not replayed:
            self.rows += [(k, v, step) for k, v in metrics.items()]

    def flush(self, state: TrialState) -> None:
        """Write the queued metrics to the metrics log, then to MLflow, and record how far they reach."""
        if not self.rows:
            return
        rows, self.rows = self.rows, []
        append_metrics(Path(self.trial.dir), rows)
        self.call(lambda: log_batch(self.client, self.trial.run_id, metrics=rows))
        state.logged_step = max(state.logged_step, *(step for _, _, step in rows))
        state.save(Path(self.trial.dir))


class WarningsToState(logging.Handler):
    """Warnings logged while a trial runs (by orch or the science code) are kept in its state, so that the
    driver shows them on every backend (a Ray worker's or a Slurm job's log is not the user's terminal)."""

    def __init__(self, state: TrialState):
        super().__init__(logging.WARNING)
        self.state = state

    def emit(self, record: logging.LogRecord) -> None:
        self.state.warnings.append(record.getMessage())


class NotesToProgress(logging.Handler):
    """INFO records logged while a trial runs (e.g. that FID reference features are being computed, minutes on a
    CPU) go to the driver's progress view as notes, on a Ray worker too."""

    def __init__(self, state: TrialState, progress: Progress):
        super().__init__(logging.INFO)
        self.state, self.progress = state, progress

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.INFO:
            self.progress(self.state.step, {"note": record.getMessage()})


def prepare_trainer(trial: Trial, device: torch.device) -> tuple[Trainer, dict[str, str], float]:
    """The trial's trainer (with its teacher when the method distils), restored from the newest checkpoint; the
    run's tags; and the wall time already spent before that checkpoint."""
    tags = environment_tags(device_name(device)) | {TRIAL_DIR: trial.dir}
    teacher = None
    if trial.teacher is not None:  # planned and trained first by the driver, or named by the study
        teacher, _ = load_teacher(trial.teacher, trial.config)
        tags[TEACHER] = trial.teacher_name
    trainer = build_trainer(trial.parsed, device, teacher)
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


@contextmanager
def notes_recorded(state: TrialState, progress: Progress | None):
    """While it lasts, orch's warnings go to the trial's state and its notes (INFO records) to `progress`."""
    handlers = [WarningsToState(state)] + ([NotesToProgress(state, progress)] if progress else [])
    logger = logging.getLogger("orch")
    level = logger.level
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        logger.setLevel(level)
        for handler in handlers:
            logger.removeHandler(handler)


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


class Recorder:
    """Rank 0's records at the ticks of the training loop: statistics and scores to the trial's metrics log and
    MLflow run (through its tracker), the best weights per score, preview samples, checkpoints, and progress
    for the driver."""

    def __init__(
        self,
        trial: Trial,
        state: TrialState,
        tracker: TrialTracker,
        trainer: Trainer,
        wall_before: float,
        progress: Progress | None,
    ):
        self.trial, self.state, self.tracker, self.trainer, self.progress = trial, state, tracker, trainer, progress
        self.dir = Path(trial.dir)
        self.ema = trial.parsed.eval.ema if trial.parsed.eval.ema is not None else trial.parsed.train.ema[0]
        self.wall_before, self.started = wall_before, time.perf_counter()

    def elapsed(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def logged(self, step: int, stats: dict[str, float]) -> None:
        cost = self.trainer.cost() | {cost_key("device_hours"): self.elapsed() * self.trainer.world / 3600}
        self.tracker.add(stats | cost, step, self.state)
        if self.progress:
            self.progress(step, {TRAIN_LOSS: stats[TRAIN_LOSS]})

    def evaluated(self, step: int, scores: dict[str, float], previews: dict[str, torch.Tensor]) -> None:
        self.tracker.add(scores, step, self.state)
        keep_best(self.dir, step, scores, self.trainer.ema.nets[self.ema])
        record_previews(self.tracker, step, previews, num_classes_of(self.trainer.dataset))
        self.state.result = scores
        if self.progress:
            self.progress(step, scores)

    def checkpointed(self, step: int) -> None:
        self.trainer.check_finite()  # never checkpoint weights that diverged since the last log tick
        self.tracker.flush(self.state)  # metrics first: a resumed trial never lacks steps its checkpoint covers
        checkpoint = {"trainer": self.trainer.state_dict(), "wall_seconds": self.elapsed()}
        save_checkpoint(self.dir, step, checkpoint, self.trial.parsed.train.keep_checkpoints)
        self.state.step = step
        self.state.save(self.dir)


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


def keep_best(trial_dir: Path, step: int, scores: dict[str, float], net: torch.nn.Module) -> None:
    """Keep the best EMA weights per metric, NFE and guidance scale (paper A reports each NFE at its best
    checkpoint) in <trial>/best/<metric>_nfe_<N>[_cfg_<ω>].pt, indexed by best/best.json ({key: {value, step}});
    "best" is each metric's direction."""
    index_path = trial_dir / "best" / "best.json"
    index = read_json(index_path)

    def better(key: str, value: float) -> bool:
        return key not in index or metric_spec(parse_eval_key(key).metric).better(value, index[key]["value"])

    improved = {key: value for key, value in scores.items() if math.isfinite(value) and better(key, value)}
    for key, value in improved.items():
        name = parse_eval_key(key).file_stem
        buffer = io.BytesIO()
        torch.save({"net": net.state_dict(), "step": step, "metric": key, "value": value}, buffer)
        atomic_write_bytes(trial_dir / "best" / f"{name}.pt", buffer.getvalue())
        index[key] = {"value": value, "step": step}
    if improved:
        write_json(index_path, index)


def record_previews(
    tracker: TrialTracker, step: int, previews: dict[str, torch.Tensor], num_classes: int | None = None
) -> None:
    """The latest samples per NFE (and guidance scale) in the trial directory, for the dashboard:
    samples/nfe_<N>[_cfg_<ω>].png, a grid of images (one row per class for conditional data; also logged to
    MLflow as samples/nfe_<N>[/cfg_<ω>]/step_<step>.png), or samples/nfe_<N>[_cfg_<ω>].npy, points."""
    from torchvision.utils import make_grid

    folder = Path(tracker.trial.dir) / "samples"
    for suffix, samples in previews.items():
        file = suffix.replace("/", "_")
        if samples.dtype != torch.uint8:
            buffer = io.BytesIO()
            np.save(buffer, samples.float().numpy())
            atomic_write_bytes(folder / f"{file}.npy", buffer.getvalue())
            continue
        per_row = len(samples) // num_classes if num_classes else math.ceil(math.sqrt(len(samples)))
        grid = make_grid(samples, nrow=per_row, padding=2, pad_value=255)
        pixels = grid.permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(buffer, format="PNG")
        atomic_write_bytes(folder / f"{file}.png", buffer.getvalue())
        name = f"samples/{suffix}/step_{step:08d}.png"
        tracker.call(lambda: tracker.client.log_image(tracker.trial.run_id, pixels, name))  # noqa: B023


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


def finish_unrun(trial: Trial, state: TrialState, reason: str) -> str:
    """Record a trial as failed without running it (e.g. its teacher did not complete)."""
    return finish(TrialTracker(MlflowClient(trial.tracking_uri), trial, log.warning), state, FAILED, reason)


def finish(tracker: TrialTracker, state: TrialState, status: str, reason: str | None, step: int | None = None) -> str:
    """Record the outcome in state.json first (the source of truth), then in MLflow; returns the status."""
    state.status, state.reason = status, reason
    if step is not None:
        state.step = step
    state.save(Path(tracker.trial.dir))
    tracker.call(lambda: record_outcome(tracker.client, tracker.trial.run_id, state, Path(tracker.trial.dir)))
    return status
