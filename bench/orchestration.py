"""Benchmark: what orchestration costs. The same study run in-process (`--backend local`, sequential) and on the
embedded Ray with 2 concurrent trials, against the bare training loop with no orch around it.

Runs two study sizes per backend, so that the difference gives the marginal cost of one more trial apart from
the fixed cost of a submission (store creation, Ray start and stop, the dashboard). Prints the bare loop's time,
the trial's own wall time inside orch (run_trial: building, MLflow logging, checkpoints, evaluation), the
per-trial overhead and Ray's marginal speed-up over local.

python bench/orchestration.py [--trials 2 6] [--steps 1500]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def study(name: str, trials: int, steps: int) -> dict:
    return {
        "name": name,
        "base": {
            "method": {"name": "fm"},
            "model": {"name": "mlp", "width": 128, "depth": 4},
            "train": {"steps": steps, "batch_size": 512, "ema": [0.99], "checkpoint_every": 500, "device": "cpu"},
            "eval": {"every": steps, "nfe": [1, 4], "num_samples": 5000},
        },
        "grid": {"train.seed": list(range(trials))},
        "backend": {"name": "ray", "max_concurrent": 2},
    }


def bare_seconds(config: dict) -> float:
    """The training loop and the final evaluation alone, as run_trial would run them, without orch."""
    import torch

    from orch.execution.build import build_trainer
    from orch.methods.training.trainer import EvalConfig
    from orch.trial.config import resolve_trial_config
    from orch.trial.typed import TrialConfig

    torch.set_num_threads(1)
    resolved, _ = resolve_trial_config(config)
    trainer = build_trainer(TrialConfig.parse(resolved), torch.device("cpu"))
    start = time.perf_counter()
    for step in range(resolved["train"]["steps"]):
        trainer.train_step(with_stats=(step + 1) % resolved["train"]["log_every"] == 0)
    trainer.evaluate(EvalConfig.model_validate(resolved["eval"]))
    return time.perf_counter() - start


def trial_seconds(study_dir: Path, name: str) -> list[float]:
    """Each trial's wall time inside orch, from its last `cost/device_hours`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    return [r.data.metrics["cost/device_hours"] * 3600 for r in runs if r.data.tags.get("orch.role") == "trial"]


def submit(path: Path, workdir: Path, backend: str) -> float:
    start = time.perf_counter()
    orch = [sys.executable, "-m", "orch.cli", "submit", str(path), "--workdir", str(workdir)]
    subprocess.run([*orch, "--backend", backend], check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, nargs=2, default=[2, 6], help="two study sizes (fixed vs per-trial)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--backends", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    args = parser.parse_args()
    small, large = args.trials
    bare = min(bare_seconds(study("bare", 1, args.steps)["base"]) for _ in range(2))  # on a quiet machine, first
    walls, inside = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for backend in args.backends:
            for n in (small, large):
                name = f"bench_{backend}_{n}"
                path = tmp / f"{name}.yaml"
                path.write_text(yaml.safe_dump(study(name, n, args.steps)))
                walls[backend, n] = submit(path, tmp, backend)
                inside[backend, n] = trial_seconds(tmp / name, name)
    print(f"flow-matching trials of {args.steps} steps (checker MLP 128x4, batch 512, 1 thread each), studies of "
          f"{small} and {large} trials; the difference separates per-trial from fixed cost")  # fmt: skip
    print(f"bare training loop + final evaluation, no orch: {bare:6.2f} s per trial")
    for backend, concurrency in (("local", 1), ("ray", 2)):
        if backend not in args.backends:
            continue
        per_trial = (walls[backend, large] - walls[backend, small]) / (large - small)
        mean_inside = sum(inside[backend, large]) / large
        fixed = walls[backend, small] - small * per_trial
        overhead = per_trial * concurrency - bare
        print(
            f"{backend:5} ({concurrency} at a time): wall {walls[backend, small]:6.1f} s / "
            f"{walls[backend, large]:6.1f} s; marginal {per_trial:5.2f} s per trial; "
            f"fixed {fixed:5.1f} s (store, Ray, dashboard); "
            f"trial inside orch {mean_inside:5.2f} s; per-trial overhead {overhead:+5.2f} s "
            f"({100 * overhead / bare:+.1f}% of the bare trial)"
        )
    if len(args.backends) == 2:
        speedup = (walls["local", large] - walls["local", small]) / (walls["ray", large] - walls["ray", small])
        print(f"marginal speed-up of ray (2 at a time) over local: {speedup:.2f}x (ideal 2 on 2 free cores)")


if __name__ == "__main__":
    main()
