"""A synthetic study in a real MLflow store, laid out exactly as `orch submit` writes it, for scale tests."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from orch.tracking.schema import AXES, FACTORS, FINGERPRINT, PARENT_RUN, ROLE, RUN_NAME, STATUS, TRIAL_ID
from orch.tracking.store import ensure_experiment, log_batch

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
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
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
        log_batch(client, run_id, metrics=rows, params=params)
        client.set_terminated(run_id)
    return uri
