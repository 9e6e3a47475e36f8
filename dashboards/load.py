"""Read a study's runs from MLflow into DataFrames: one row per trial, and the metric histories."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.tracking import MlflowClient

from orch.tracking.schema import (
    DEVICE,
    DIRECTION,
    EVAL,
    FACTORS,
    FINAL_TAG,
    FINGERPRINT,
    GENERATION,
    GIT_COMMIT,
    GRAD_NORM,
    MEASURE,
    REASON,
    ROLE,
    RUN_NAME,
    SEARCH_ARTIFACT,
    SEARCH_METRIC,
    STATUS,
    TARGET_STD,
    TRAIN_LOSS,
    TRIAL_ID,
    cost_key,
)

HISTORY_PREFIXES = (f"{TARGET_STD}/", TRAIN_LOSS, GRAD_NORM, f"{EVAL}/", cost_key("device_hours"))
"""The keys whose whole history the dashboard loads (of other keys, the last value)."""
RUN_CHUNK = 500


def parse_param(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


FACTOR = "factor."
"""Prefix of the run columns that hold a trial's factor levels as labels: `factor.<axis>`."""


def factor_levels(tag: str | None) -> dict[str, Any]:
    """`factor.<axis>` → level label, and `factor_index.<axis>` → the level's place on its axis (None for a
    searched value), from a trial run's orch.factors tag."""
    try:
        levels = json.loads(tag) if tag else {}
    except ValueError:
        return {}
    row = {}
    for axis, (index, label) in levels.items():
        row[f"{FACTOR}{axis}"], row[f"factor_index.{axis}"] = label, index
    return row


def sql_store(client: MlflowClient):
    """MLflow's SQL store behind a client (sqlite, PostgreSQL, MySQL), for a one-query read of many histories:
    per-run or per-key calls (even MLflow's windowed bulk query) took over a minute for a 1,000-trial study.
    The store's session and models are MLflow-internal, so this is used only with the MLflow minor version it
    was written for (3.17); otherwise, and for other stores, None: the public API is used."""
    if not mlflow.__version__.startswith(SQL_FAST_PATH_VERSION):
        return None
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    return store if hasattr(store, "ManagedSessionMaker") else None


SQL_FAST_PATH_VERSION = "3.17."


def metric_histories(client: MlflowClient, run_ids: list[str], keys: list[str], fast: bool = True) -> pd.DataFrame:
    """run_id, key, step, value of every logged point of `keys` over many runs: one query per 500 runs on a SQL
    store (see sql_store), else (or with fast=False) MLflow's public per-run history calls."""
    store = sql_store(client) if fast else None
    rows: list[tuple] = []
    if store is not None:
        from mlflow.store.tracking.dbmodels.models import SqlMetric

        with store.ManagedSessionMaker() as session:
            for i in range(0, len(run_ids), RUN_CHUNK):
                query = session.query(SqlMetric.run_uuid, SqlMetric.key, SqlMetric.step, SqlMetric.value)
                rows += query.filter(SqlMetric.run_uuid.in_(run_ids[i : i + RUN_CHUNK]), SqlMetric.key.in_(keys)).all()
    else:
        for run_id in run_ids:
            for key in keys:
                rows += [(run_id, key, m.step, m.value) for m in client.get_metric_history(run_id, key)]
    history = pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])
    return history.astype({"step": "int64", "value": "float64"})


def study_runs(tracking_uri: str, study: str, role: str) -> tuple[MlflowClient, list[Run]]:
    """The study's parent run (role "study") or its trial runs (role "trial"). Raises LookupError when the store
    has no such study."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        raise LookupError(f"no MLflow experiment named {study!r} at {tracking_uri}")
    limit = 1 if role == "study" else 50000
    return client, client.search_runs([experiment.experiment_id], f"tags.`{ROLE}` = '{role}'", max_results=limit)


def load_runs(tracking_uri: str, study: str) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """(runs, history, parent tags). runs: one row per trial with trial_id, status, label, reason, git_commit,
    device, `fingerprint.<metric>`, `measure.<metric>`, `direction.<metric>`, `final.<metric>` (how `orch eval`
    measured final/<metric>/…, JSON), factor levels, every param and the latest value of every metric. history:
    trial_id, key, step, value of the training curves, evaluations and device-hours."""
    _, parents = study_runs(tracking_uri, study, "study")
    client, runs = study_runs(tracking_uri, study, "trial")
    rows, keys, trial_of = [], set(), {}
    prefixes = {FINGERPRINT: "fingerprint.", MEASURE: "measure.", DIRECTION: "direction.", FINAL_TAG: "final."}
    for run in runs:
        tags = run.data.tags
        trial_of[run.info.run_id] = tags.get(TRIAL_ID)
        row = {
            "trial_id": tags.get(TRIAL_ID),
            "status": tags.get(STATUS, "unknown"),
            "label": tags.get(RUN_NAME, tags.get(TRIAL_ID)),
            "reason": tags.get(REASON),
            "git_commit": tags.get(GIT_COMMIT),
            "device": tags.get(DEVICE),
            "generation": tags.get(GENERATION),
            "start_time": run.info.start_time,
        }
        for tag_prefix, column in prefixes.items():
            row |= {column + k.removeprefix(tag_prefix): v for k, v in tags.items() if k.startswith(tag_prefix)}
        row |= factor_levels(tags.get(FACTORS))
        row |= {k: parse_param(v) for k, v in run.data.params.items()}
        row |= run.data.metrics
        rows.append(row)
        keys |= {k for k in run.data.metrics if k.startswith(HISTORY_PREFIXES)}
    history = metric_histories(client, list(trial_of), sorted(keys))
    history.insert(0, "trial_id", history.pop("run_id").map(trial_of))
    return pd.DataFrame(rows), history, (parents[0].data.tags if parents else {})


def load_search(tracking_uri: str, study: str) -> dict | None:
    """The study's search block (metric, mode, space, …) from its parent run's artifact, or None for a grid."""
    client, parents = study_runs(tracking_uri, study, "study")
    if not parents or SEARCH_METRIC not in parents[0].data.tags:
        return None
    quiet = {MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name: "false"}  # no download bar in the driver's output
    with tempfile.TemporaryDirectory() as scratch, mock.patch.dict(os.environ, quiet):
        path = client.download_artifacts(parents[0].info.run_id, SEARCH_ARTIFACT, scratch)
        return json.loads(Path(path).read_text())
