"""Read a study's runs from MLflow into DataFrames: one row per trial, and the metric histories."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

HISTORY_PREFIXES = ("train/target_std/", "train/loss")


def parse_param(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def load_runs(tracking_uri: str, study: str) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """(runs, history, parent tags). runs: trial_id, status, label, every param and the latest value of every
    metric. history: trial_id, key, step, value for the training curves."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        raise LookupError(f"no MLflow experiment named {study!r} at {tracking_uri}")
    parents = client.search_runs([experiment.experiment_id], "tags.`orch.role` = 'study'", max_results=1)
    runs = client.search_runs([experiment.experiment_id], "tags.`orch.role` = 'trial'", max_results=50000)
    rows, history = [], []
    for run in runs:
        trial_id = run.data.tags.get("orch.trial_id")
        row = {
            "trial_id": trial_id,
            "status": run.data.tags.get("orch.status", "unknown"),
            "label": run.data.tags.get("mlflow.runName", trial_id),
            "reason": run.data.tags.get("orch.reason"),
            "git_commit": run.data.tags.get("orch.git_commit"),
            "device": run.data.tags.get("orch.device"),
        }
        row |= {k: parse_param(v) for k, v in run.data.params.items()}
        row |= run.data.metrics
        rows.append(row)
        for key in run.data.metrics:
            if key.startswith(HISTORY_PREFIXES):
                history += [(trial_id, key, m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
    runs_df = pd.DataFrame(rows)
    history_df = pd.DataFrame(history, columns=["trial_id", "key", "step", "value"])
    return runs_df, history_df, (parents[0].data.tags if parents else {})
