"""A trial's records while it runs: metrics to its metrics log and MLflow run (TrialTracker), the best weights
and preview samples, checkpoints and progress at the training loop's ticks (Recorder), its warnings and notes,
and its outcome."""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from orch.execution.trial import Progress, Trial
from orch.methods.contracts.guidance import num_classes_of
from orch.methods.evaluation.metric import metric as metric_spec
from orch.methods.training.trainer import Trainer
from orch.tracking.schema import TRAIN_LOSS, cost_key, parse_eval_key
from orch.tracking.store import TRACKING_ERRORS, log_batch, not_yet_logged, record_outcome, store_error
from orch.trial.state import (
    TrialState,
    append_metrics,
    atomic_write_bytes,
    read_json,
    read_metrics,
    save_checkpoint,
    write_json,
)
from orch.trial.status import FAILED

log = logging.getLogger(__name__)


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
            self.broken = store_error(e)
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
        if self.broken is None:  # never past a write MLflow did not take
            state.logged_step = max(state.logged_step, *(step for _, _, step in rows))
        else:
            state.unlogged = True
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
