"""Teachers of distillation methods (sdei, sdee, stei with a teacher, scd): named by the study, or trained once.

A teacher the study does not name is a flow-matching model of the trial's dataset and network, trained with the
budget of `method.teacher`. It is identified by the hash of that config, trained at most once per workdir (a
file lock serialises concurrent trials, Ray workers or Slurm jobs on a shared filesystem), tracked in the MLflow
experiment `orch-teachers`, and then reused by every trial and study that asks for the same one:

    <workdir>/teachers/trials/<hash>/   state.json, checkpoints/, teacher.pt (config + EMA weights)

Training goes through run_trial itself, so an interrupted teacher resumes from its checkpoint like any trial.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient
from torch import nn

from methods.storage import exclusive
from orchestrator import runner
from orchestrator.build import build_network
from orchestrator.config import resolve_trial_config, trial_id
from orchestrator.state import COMPLETED, TrialState, atomic_write_bytes, load_latest_checkpoint
from orchestrator.study import TrialSpec
from orchestrator.tracking import ensure_experiment, ensure_parent_run

log = logging.getLogger(__name__)

EXPERIMENT = "orch-teachers"
TEACHER_FILE = "teacher.pt"


class TeacherError(Exception):
    """A teacher that cannot be loaded or trained; names the path and what is wrong."""


def teacher_config(config: dict) -> dict:
    """The flow-matching trial that trains the default teacher of `config`: same dataset and network, the budget
    of method.teacher, evaluated once at the end with the student's metrics."""
    spec = config["method"]["teacher"]
    train = {k: spec[k] for k in ("steps", "batch_size", "lr", "lr_decay_steps", "seed")}
    train |= {"ema": [spec["ema"]], "checkpoint_every": max(1, spec["steps"] // 4)}
    evaluation = config["eval"] | {"every": spec["steps"], "ema": None}
    raw = {
        "dataset": config["dataset"],
        "model": config["model"],
        "method": {"name": "fm"},
        "time_sampler": {"name": "uniform"},
        "train": train,
        "eval": evaluation,
    }
    resolved, problems = resolve_trial_config(raw)
    if problems:
        raise TeacherError("cannot build the teacher's config: " + "; ".join(map(str, problems)))
    return resolved


def load_teacher(path: str | Path) -> tuple[nn.Module, dict]:
    """A teacher network and its config from a teacher file or from a trial directory (newest checkpoint, first
    EMA copy). Raises TeacherError naming the path and the expected format."""
    path = Path(path)
    expected = f"expected an orch teacher file ({TEACHER_FILE}) or a trial directory with trial.json and checkpoints/"
    try:
        if path.is_dir():
            config = json.loads((path / "trial.json").read_text())["config"]
            checkpoint = load_latest_checkpoint(path)
            if checkpoint is None:
                raise TeacherError(f"teacher {path}: no readable checkpoint in {path / 'checkpoints'}")
            ema = checkpoint["trainer"]["ema"]
            state = ema[str(config["train"]["ema"][0])]
        else:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            config, state = saved["config"], saved["net"]
        net = build_network(config)
        net.load_state_dict(state)
    except TeacherError:
        raise
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise TeacherError(f"teacher {path}: cannot load ({type(e).__name__}: {first_line}); {expected}") from None
    return net, config


def train_teacher(config: dict, key: str, teachers_dir: Path, tracking_uri: str) -> Path:
    """Train (or finish training) the teacher trial `key` and write its teacher file."""
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, EXPERIMENT, teachers_dir / "artifacts")
    parent_id = ensure_parent_run(client, experiment_id, EXPERIMENT, {})
    spec = TrialSpec(key, config, {"teacher": "fm"})
    trial, _ = runner.open_trial(client, experiment_id, parent_id, EXPERIMENT, teachers_dir, spec, key)
    log.warning("training flow-matching teacher %s (%d steps) in %s", key, config["train"]["steps"], trial.dir)
    status = runner.run_trial(trial)
    state = TrialState.load(Path(trial.dir))
    if status != COMPLETED:
        raise TeacherError(f"teacher {key} did not complete ({status}: {state.reason}); see {trial.dir}")
    checkpoint = load_latest_checkpoint(Path(trial.dir))
    weights = checkpoint["trainer"]["ema"][str(config["train"]["ema"][0])]
    buffer = io.BytesIO()
    torch.save({"config": config, "net": weights}, buffer)
    path = Path(trial.dir) / TEACHER_FILE
    atomic_write_bytes(path, buffer.getvalue())
    return path


def obtain_teacher(config: dict, workdir: Path, tracking_uri: str) -> tuple[nn.Module, str]:
    """The trial's teacher and a description for its run's tags: the named one, else the cached default one
    (trained here first if no trial has trained it yet)."""
    spec = config["method"]["teacher"]
    if spec["path"] is not None:
        net, _ = load_teacher(spec["path"])
        return net, spec["path"]
    teacher = teacher_config(config)
    key = trial_id(teacher)
    teachers_dir = workdir / "teachers"
    trial_dir = teachers_dir / "trials" / key
    trial_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(trial_dir / "lock"):
        path = trial_dir / TEACHER_FILE
        if not path.exists():
            path = train_teacher(teacher, key, teachers_dir, tracking_uri)
    net, _ = load_teacher(path)
    return net, key
