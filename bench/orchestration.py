"""Benchmark: what orchestration costs. The same study run in-process (`--backend local`, sequential) and on the
embedded Ray with 2 concurrent trials, against the bare training loop with no orch around it.

Prints, per trial: the bare loop's time, the trial's own wall time inside orch (run_trial: building, MLflow
logging, checkpoints, evaluation), and the driver's share (study set-up, Ray start and stop, the dashboard)
for each backend; and Ray's speed-up over local.

python bench/orchestration.py [--trials 4] [--steps 1500]
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

    from orchestrator.config import resolve_trial_config
    from orchestrator.runner import build_trainer

    torch.set_num_threads(1)
    resolved, _ = resolve_trial_config(config)
    trainer = build_trainer(resolved, torch.device("cpu"))
    start = time.perf_counter()
    for step in range(resolved["train"]["steps"]):
        trainer.train_step(with_stats=(step + 1) % resolved["train"]["log_every"] == 0)
    trainer.evaluate(resolved["eval"]["nfe"], ["kl"], resolved["eval"]["num_samples"], 0.99)
    return time.perf_counter() - start


def trial_seconds(study_dir: Path, name: str) -> list[float]:
    """Each trial's wall time inside orch, from its last `cost/device_hours`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    return [r.data.metrics["cost/device_hours"] * 3600 for r in runs if r.data.tags.get("orch.role") == "trial"]


def submit(path: Path, workdir: Path, backend: str) -> float:
    start = time.perf_counter()
    orch = [sys.executable, "-m", "orchestrator.cli", "submit", str(path), "--workdir", str(workdir)]
    subprocess.run([*orch, "--backend", backend], check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        walls, inside = {}, {}
        for backend in ("local", "ray"):
            name = f"bench_{backend}"
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump(study(name, args.trials, args.steps)))
            walls[backend] = submit(path, tmp, backend)
            inside[backend] = trial_seconds(tmp / name, name)
        bare = bare_seconds(study("bare", 1, args.steps)["base"])
    n = args.trials
    print(f"{n} flow-matching trials of {args.steps} steps (checker MLP 128x4, batch 512, 1 thread each)")
    print(f"bare training loop + final evaluation, no orch:      {bare:7.2f} s per trial")
    for backend in ("local", "ray"):
        mean_inside = sum(inside[backend]) / n
        driver = walls[backend] - (sum(inside[backend]) if backend == "local" else 0)
        print(
            f"{backend:5}: wall {walls[backend]:7.2f} s; trial inside orch {mean_inside:6.2f} s "
            f"(run_trial overhead {mean_inside - bare:+5.2f} s = {100 * (mean_inside - bare) / bare:+4.1f}%)"
            + (f"; driver {driver / n:5.2f} s per trial" if backend == "local" else "")
        )
    ideal = sum(inside["ray"]) / 2
    print(f"ray (2 at a time) vs local: speed-up {walls['local'] / walls['ray']:.2f}x; "
          f"ray wall {walls['ray']:.1f} s vs ideal {ideal:.1f} s (half the summed trial time)")  # fmt: skip


if __name__ == "__main__":
    main()
