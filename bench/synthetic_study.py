"""A synthetic study in a real MLflow store, laid out exactly as `orch submit` writes it, for scale tests."""

from __future__ import annotations

import itertools
import json
import sqlite3
import time
import uuid
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from orch.tracking.schema import AXES, FACTORS, FINGERPRINT, PARENT_RUN, ROLE, RUN_NAME, STATUS, TRIAL_ID
from orch.tracking.store import ensure_experiment

NFES = (1, 2, 4, 8, 16)


def synthetic_study(
    study_dir: Path, n_trials: int, steps: int = 1000, points: int = 10, name: str = "synthetic"
) -> str:
    """Write `n_trials` finished trials (methods × stop-gradients × seeds) with final metrics and short
    histories; returns the tracking URI. One diverged trial in 50."""
    uri = f"sqlite:///{study_dir.resolve() / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, name, study_dir / "artifacts")
    methods, stopgrads = ["lsd", "esd", "psd_mid", "psd_unif"], ["convex", "none"]
    seeds = range(-(-n_trials // (len(methods) * len(stopgrads))))
    grid = {"method.name": methods, "method.stopgrad": stopgrads, "train.seed": list(seeds)}
    parent = client.create_run(
        experiment_id,
        tags={
            ROLE: "study",
            RUN_NAME: name,
            AXES: json.dumps(list(grid)),
        },
    ).info.run_id
    rng = np.random.default_rng(0)
    combos = list(itertools.product(methods, stopgrads, seeds))[:n_trials]
    log_steps = np.linspace(steps / points, steps, points).astype(int)
    runs = []
    for i, (method, stopgrad, seed) in enumerate(combos):
        status = "diverged" if i % 50 == 49 else "completed"
        tags = {
            PARENT_RUN: parent,
            ROLE: "trial",
            TRIAL_ID: f"t{i:06d}",
            STATUS: status,
            RUN_NAME: f"{method} {stopgrad} {seed}",
            f"{FINGERPRINT}kl": "kl-synthetic",
            FACTORS: json.dumps(
                {axis: [grid[axis].index(v), str(v)] for axis, v in zip(grid, (method, stopgrad, seed))}
            ),
        }
        quality = 0.1 + 0.05 * methods.index(method) + 0.02 * stopgrads.index(stopgrad)
        rows = []
        for k, step in enumerate(log_steps):
            progress = (k + 1) / points
            rows += [
                ("train/loss", 1 - 0.5 * progress + 0.01 * rng.standard_normal(), step),
                ("train/grad_norm", 0.3 + 0.01 * rng.standard_normal(), step),
                ("train/target_std/diag", 0.5, step),
                (f"train/target_std/{method[:3]}", 0.3 * progress, step),
                ("cost/device_hours", progress * 0.01 * (1 + methods.index(method)), step),
            ]
            rows += [(f"train/target_std/{method[:3]}/bin_{b}", 0.2 + 0.05 * b, step) for b in range(4)]
            rows += [
                (f"eval/kl/nfe_{n}", quality * (1 + 1 / n) / progress + 0.01 * rng.standard_normal(), step)
                for n in NFES
            ]
        rows += [
            ("cost/sec_per_kimg", 0.02 * (1 + methods.index(method)), steps),
            ("cost/peak_mem_mb", 1000.0, steps),
            ("cost/fwd_per_sample", 1.0, steps),
            ("cost/jvp_per_sample", 0.25, steps),
            ("cost/samples_per_sec", 5e4, steps),
        ]
        params = {"method.name": method, "method.stopgrad": stopgrad, "train.seed": seed, "train.steps": steps}
        runs.append((tags, params, rows))
    write_finished_runs(study_dir / "mlflow.db", experiment_id, client.get_experiment(experiment_id), runs)
    return uri


def write_finished_runs(db: Path, experiment_id: str, experiment, runs: list) -> None:
    """Finished runs (tags, params, metric rows) in one SQLite transaction, with the rows MLflow's own API
    writes (runs, tags, params, metrics and each key's latest value): the API takes a transaction per call, a
    minute for a thousand runs on a small CPU, where this takes seconds."""
    now = int(time.time() * 1000)
    with sqlite3.connect(db) as connection:
        for tags, params, rows in runs:
            run_id = uuid.uuid4().hex
            artifacts = f"{experiment.artifact_location}/{run_id}/artifacts"
            connection.execute(
                "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status,"
                " start_time, end_time, source_version, lifecycle_stage, artifact_uri, experiment_id)"
                " VALUES (?, ?, 'UNKNOWN', '', '', 'unknown', 'FINISHED', ?, ?, '', 'active', ?, ?)",
                (run_id, tags[RUN_NAME], now, now, artifacts, int(experiment_id)),
            )
            connection.executemany(
                "INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?)", [(k, v, run_id) for k, v in tags.items()]
            )
            connection.executemany(
                "INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)",
                [(k, str(v), run_id) for k, v in params.items()],
            )
            connection.executemany(
                "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?, ?, ?, ?, ?, 0)",
                [(k, float(v), now, run_id, int(step)) for k, v, step in rows],
            )
            latest = {k: (float(v), int(step)) for k, v, step in sorted(rows, key=lambda row: row[2])}
            connection.executemany(
                "INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) VALUES (?, ?, ?, ?, 0, ?)",
                [(k, v, now, step, run_id) for k, (v, step) in latest.items()],
            )
