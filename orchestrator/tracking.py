"""MLflow layout: one experiment per study, a parent run for the study, one child run per trial."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import SQLAlchemyError

from orchestrator.config import flatten, metric_fingerprint

ROLE, TRIAL_ID, STATUS = "orch.role", "orch.trial_id", "orch.status"
FACTORS = "orch.factors"
"""A trial's factor levels, JSON {axis: [index on the axis, label]}: what the dashboard groups by."""
GENERATION = "orch.generation"
"""The version of the study file (a hash of it, resolved) that last planned a trial, or that a parent ran."""
TRACKING_ERRORS = (MlflowException, SQLAlchemyError, OSError)
"""What a tracking store that went away raises (sqlite file deleted, server down, disk full)."""
PACKAGES = ("torch", "ray", "mlflow", "optuna", "pandas", "plotly", "pydantic", "submitit", "numpy")

for noisy in ("alembic", "mlflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def default_tracking_uri(study_dir: Path) -> str:
    return f"sqlite:///{study_dir.resolve() / 'mlflow.db'}"


def git_commit() -> str:
    """HEAD of the checkout orch runs from, with "-dirty" when tracked files differ from it."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=here,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_tags(device: str | None = None) -> dict[str, str]:
    """What a result depends on besides its config: code version, packages, host and device."""
    tags = {"orch.git_commit": git_commit(), "orch.python": platform.python_version(), "orch.host": platform.node()}
    if device is not None:
        tags["orch.device"] = device
    for package in PACKAGES:
        try:
            tags[f"orch.version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return tags


def find_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    return client.search_runs([experiment_id], filter_string=filter_string, max_results=50000)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path) -> str:
    """The study's experiment, created with an explicit absolute artifact location on first use."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_root.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=artifact_root.resolve().as_uri())


def ensure_parent_run(client: MlflowClient, experiment_id: str, study_name: str, tags: dict[str, str]) -> str:
    """The study's parent run (reused across submissions so a study stays one tree of runs)."""
    found = find_runs(client, experiment_id, f"tags.`{ROLE}` = 'study'")
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(experiment_id, tags={ROLE: "study", "mlflow.runName": study_name}).info.run_id
    log_batch(client, run_id, tags=tags)
    return run_id


def ensure_trial_run(
    client: MlflowClient, experiment_id: str, parent_id: str, trial_id: str, label: str, config: dict, known: str | None
) -> str:
    """The trial's child run: the one recorded in its state if the store has it, else one tagged with its id,
    else a new one."""
    if known is not None and run_exists(client, known, experiment_id):
        return known
    found = find_runs(client, experiment_id, f"tags.`{TRIAL_ID}` = '{trial_id}'")
    if found:
        return found[0].info.run_id
    tags = {
        "mlflow.parentRunId": parent_id,
        ROLE: "trial",
        TRIAL_ID: trial_id,
        STATUS: "pending",
        "mlflow.runName": label,
    }
    tags |= {f"orch.fingerprint.{m}": metric_fingerprint(m, config) for m in config["eval"]["metrics"]}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    log_batch(
        client,
        run_id,
        params={k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in flatten(config).items()},
    )
    client.update_run(run_id, status="SCHEDULED")
    return run_id


def run_exists(client: MlflowClient, run_id: str, experiment_id: str) -> bool:
    try:
        return client.get_run(run_id).info.experiment_id == experiment_id
    except MlflowException:
        return False


def log_batch(
    client: MlflowClient,
    run_id: str,
    metrics: list[tuple[str, float, int]] = (),
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    """Log in MLflow's batch-size limits (1000 metrics, 100 params, 100 tags per call)."""
    now = int(time.time() * 1000)
    metric_objs = [Metric(k, float(v), now, int(s)) for k, v, s in metrics]
    param_objs = [Param(k, str(v)) for k, v in (params or {}).items()]
    tag_objs = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for i in range(0, len(metric_objs), 1000):
        client.log_batch(run_id, metrics=metric_objs[i : i + 1000])
    for i in range(0, len(param_objs), 100):
        client.log_batch(run_id, params=param_objs[i : i + 100])
    for i in range(0, len(tag_objs), 100):
        client.log_batch(run_id, tags=tag_objs[i : i + 100])
