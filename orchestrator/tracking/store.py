"""The writes to MLflow, and the only writer of outcome tags: one experiment per study, a parent run for the study,
one child run per trial (names in orchestrator/tracking/schema.py)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import platform
import sqlite3
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import SQLAlchemyError

from orch.methods.evaluation.metric import metric
from orch.tracking.schema import (
    DEVICE,
    DIRECTION,
    EXPERIMENT_KIND,
    FINGERPRINT,
    GIT_COMMIT,
    HOST,
    MEASURE,
    PARENT_RUN,
    PYTHON,
    REASON,
    ROLE,
    RUN_NAME,
    STATUS,
    STOPPED_STEP,
    TRAINING,
    TRIAL_ID,
    VERSION,
)
from orch.tracking.source import git_commit, source_tags
from orch.trial.config import flatten, metric_description, metric_fingerprint
from orch.trial.state import FINAL_RESULTS, TrialState, read_json, read_metrics
from orch.trial.status import CANCELLED, FAILED, FINISHED_STATES, PENDING, RUN_STATUS, RUNNING

TRACKING_ERRORS = (MlflowException, SQLAlchemyError, OSError)
"""What a tracking store that went away raises (sqlite file deleted, server down, disk full)."""


def store_error(error: BaseException) -> str:
    """`Type: message` of a tracking store's error on one line: for SQLAlchemy's, the database's own error (e.g.
    `DatabaseError: database disk image is malformed`), not its SQL and link lines."""
    cause = getattr(error, "orig", None) or error
    return f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:300]}"


PACKAGES = ("torch", "ray", "mlflow", "optuna", "pandas", "plotly", "pydantic", "submitit", "numpy")

for noisy in ("alembic", "mlflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def default_tracking_uri(study_dir: Path) -> str:
    return f"sqlite:///{study_dir.resolve() / 'mlflow.db'}"


def rebase_artifacts(db: Path, old_root: str, new_root: str) -> None:
    """Point a copied sqlite store's experiments and runs at the copy's artifact folder (MLflow records them as
    absolute URIs, which would otherwise still name the original's)."""
    with contextlib.closing(sqlite3.connect(db)) as connection, connection:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
            connection.execute(
                f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                (new_root, len(old_root) + 1, len(old_root), old_root),
            )


def rebased_uri(uri: str, recorded_study_dir: Path, study_dir: Path) -> str:
    """A tracking URI a study recorded, for where the study is now: its default store (the sqlite file in the
    study directory) goes with a copied or moved study directory; any other store is the one recorded."""
    if uri == default_tracking_uri(recorded_study_dir):
        return default_tracking_uri(study_dir)
    return uri


@functools.cache
def environment_tags(device: str | None = None) -> dict[str, str]:
    """What a result depends on besides its config: code version, packages, host and device."""
    tags = {GIT_COMMIT: git_commit(), PYTHON: platform.python_version(), HOST: platform.node()}
    if device is not None:
        tags[DEVICE] = device
    for package in PACKAGES:
        try:
            tags[f"{VERSION}{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return tags


def find_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    return client.search_runs([experiment_id], filter_string=filter_string, max_results=50000)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path) -> str:
    """The study's experiment, created with an explicit absolute artifact location on first use."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        artifact_root.mkdir(parents=True, exist_ok=True)
        experiment_id = client.create_experiment(name, artifact_location=artifact_root.resolve().as_uri())
    else:
        experiment_id = experiment.experiment_id
    if (experiment.tags if experiment else {}).get(EXPERIMENT_KIND) != TRAINING:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, TRAINING)  # the UI's runs view, not GenAI traces
    return experiment_id


def ensure_parent_run(client: MlflowClient, experiment_id: str, study_name: str, tags: dict[str, str]) -> str:
    """The study's parent run (reused across submissions so a study stays one tree of runs)."""
    found = find_runs(client, experiment_id, f"tags.`{ROLE}` = 'study'")
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(experiment_id, tags={ROLE: "study", RUN_NAME: study_name}).info.run_id
    log_batch(client, run_id, tags=source_tags() | tags)
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
    tags = source_tags() | {PARENT_RUN: parent_id, ROLE: "trial", TRIAL_ID: trial_id, STATUS: PENDING, RUN_NAME: label}
    tags |= measure_tags(config, config["eval"]["metrics"])
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    log_batch(
        client,
        run_id,
        params={k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in flatten(config).items()},
    )
    log_dataset(client, run_id, config["dataset"])
    client.update_run(run_id, status="SCHEDULED")
    return run_id


def log_dataset(client: MlflowClient, run_id: str, dataset: dict) -> None:
    """The run's dataset as its input. MLflow inserts a dataset's row on its first use without a lock, so two
    trials starting together can both try: the loser's UNIQUE violation means the row is there now, and the
    second try links to it."""
    inputs = [dataset_input(dataset)]
    try:
        client.log_inputs(run_id, datasets=inputs)
    except MlflowException as e:
        if "UNIQUE constraint failed: datasets" not in str(e):
            raise
        client.log_inputs(run_id, datasets=inputs)


def dataset_input(dataset: dict) -> DatasetInput:
    """The trial's dataset as an MLflow input: its name, its options as the source, a digest of them."""
    source = json.dumps(dataset, sort_keys=True)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    entity = Dataset(name=dataset["name"], digest=digest, source_type="orch", source=source)
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", "training")])


def measure_tags(config: dict, metrics: list[str]) -> dict[str, str]:
    """How each metric of a trial is measured: its fingerprint, in words, and whether lower or higher is better."""
    tags = {f"{FINGERPRINT}{m}": metric_fingerprint(m, config) for m in metrics}
    tags |= {f"{MEASURE}{m}": metric_description(m, config) for m in metrics}
    return tags | {f"{DIRECTION}{m}": metric(m).direction for m in metrics}


def clear_outcome(client: MlflowClient, run_id: str) -> None:
    """Remove an earlier outcome's reason and stopped step from a run that runs again (e.g. after a cancel)."""
    tags = client.get_run(run_id).data.tags
    for key in (REASON, STOPPED_STEP):
        if key in tags:
            client.delete_tag(run_id, key)


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


def mark_running(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    """A trial's run as it (re)starts: RUNNING, without an earlier outcome's reason, with `tags` (environment)."""
    client.update_run(run_id, status="RUNNING")
    clear_outcome(client, run_id)
    log_batch(client, run_id, tags=tags | {STATUS: RUNNING})


def record_outcome(client: MlflowClient, run_id: str, state: TrialState, trial_dir: Path) -> None:
    """Write a trial's outcome (status, reason, step) from its state into its MLflow run and end the run; a
    failure's whole traceback also goes in as the artifact failure/traceback.txt, a finished trial's index of
    its best checkpoints (in the trial directory, tag orch.trial_dir) as best/best.json."""
    tags = {STATUS: state.status}
    if state.reason is not None:
        tags |= {REASON: state.reason[-5000:], STOPPED_STEP: str(state.step)}
    else:
        clear_outcome(client, run_id)
    log_batch(client, run_id, tags=tags)
    if state.status == FAILED and state.reason:
        client.log_text(run_id, state.reason, "failure/traceback.txt")
    if state.status in FINISHED_STATES and (best := trial_dir / "best" / "best.json").is_file():
        client.log_artifact(run_id, str(best), "best")
    client.set_terminated(run_id, status=RUN_STATUS.get(state.status, "FINISHED"))


def not_yet_logged(
    client: MlflowClient, run_id: str, rows: list[tuple[str, float, int]]
) -> list[tuple[str, float, int]]:
    """The rows (key, value, step) that the run does not hold at their step: after an interruption between
    writing a value and recording that it was written, what to log so that it is there once, not twice."""
    history = {key: {(m.step, m.value) for m in client.get_metric_history(run_id, key)} for key, _, _ in rows}
    return [(key, value, step) for key, value, step in rows if (step, value) not in history[key]]


def replay_run(client: MlflowClient, run_id: str, trial_dir: Path, state: TrialState) -> int:
    """Fill a new run with what the trial directory holds: every logged metric, the outcome, and what `orch eval`
    logged (final.json). Returns the number of final rows logged again."""
    log_batch(client, run_id, metrics=read_metrics(trial_dir))
    if state.status not in (PENDING, RUNNING):
        record_outcome(client, run_id, state, trial_dir)
    final = read_json(trial_dir / FINAL_RESULTS)
    rows = not_yet_logged(client, run_id, [tuple(row) for row in final.get("logged", [])])
    log_batch(client, run_id, metrics=rows, tags=final.get("tags", {}))
    return len(rows)


def reconcile(client: MlflowClient, experiment_id: str, study_dir: Path) -> int:
    """Make MLflow agree with the trial directories (the source of truth) for ended trials: a worker can be
    torn down between writing state.json and its last MLflow writes (e.g. Ray shutting down right after Tune
    stopped a trial). Returns the number of runs corrected."""
    runs = {r.info.run_id: r for r in find_runs(client, experiment_id, f"tags.`{ROLE}` = 'trial'")}
    fixed = 0
    for trial_dir in (study_dir / "trials").iterdir():
        state = TrialState.load(trial_dir)
        run = runs.get(state.run_id)
        if run is None or state.status not in (*FINISHED_STATES, FAILED, CANCELLED):
            continue
        if run.data.tags.get(STATUS) != state.status or run.info.status == "RUNNING":
            record_outcome(client, state.run_id, state, trial_dir)
            fixed += 1
    return fixed
