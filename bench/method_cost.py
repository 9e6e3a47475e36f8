"""Benchmark: training-step cost of every method relative to flow matching on the same network and batch.

Each method runs in a fresh process (so that peak memory is its own): a few warm-up steps, then timed steps.
Prints time per step and peak memory as ratios to FM, next to the measured network evaluations per sample and
paper B's measured ratios (docs/methods.md §4.4). On CPU the memory is the process's peak RSS above its RSS before
the first training step (the working memory of training, allocator caching included); on a GPU it is
torch.cuda.max_memory_allocated.

python bench/method_cost.py [--width 512] [--depth 5] [--batch 4096] [--steps 30] [--device cpu]
python bench/method_cost.py --model unet [--channels 16] [--batch 64]   # the small UNet on MNIST
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Paper B's measured training cost relative to its diffusion teacher (EDM, CIFAR-10; time, memory)
PAPER_B = {"meanflow": (1.82, 4.46), "sdei": (1.60, 1.11), "stei": (2.49, 1.95), "sdee": (1.60, 1.11),
           "stee": (1.26, 1.07)}  # fmt: skip


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def trial_config(method: str, model: str, width: int, depth: int, channels: int, batch: int, device: str) -> dict:
    """The checker MLP on the checkerboard, or the small UNet on MNIST."""
    base = {
        "method": {"name": method},
        "train": {"batch_size": batch, "device": device, "ema": [0.999]},
    }
    if model == "mlp":
        return base | {"model": {"width": width, "depth": depth}}
    unet = {"name": "unet", "channels": channels, "time_scale": 1000.0}
    return base | {"dataset": {"name": "mnist"}, "model": unet, "eval": {"metrics": ["fid"]}}


def measure(
    method: str, model: str, width: int, depth: int, channels: int, batch: int, steps: int, device: str
) -> dict:
    """One method's step time (median) and peak memory, in this process."""
    config = trial_config(method, model, width, depth, channels, batch, device)
    return {"method": method, **measure_config(config, steps, device)}


def measure_config(config: dict, steps: int, device: str) -> dict:
    """The step time (median of `steps`, after 3 warm-up steps), working memory and measured evaluations per
    sample of the trial `config`, in this process (run it in a fresh one, so that its peak memory is its own)."""
    import torch

    from orch.execution.build import build_network, build_trainer, needs_teacher
    from orch.methods.training.trainer import peak_memory_mb, reset_peak_memory
    from orch.trial.config import resolve_trial_config
    from orch.trial.typed import TrialConfig

    torch.set_num_threads(1)
    config, problems = resolve_trial_config(config)
    assert not problems, problems
    parsed = TrialConfig.parse(config)
    teacher = build_network(parsed) if needs_teacher(config["method"]) else None  # any frozen net costs the same
    trainer = build_trainer(parsed, torch.device(device), teacher)
    baseline = resident_mb()  # before any step: what training adds on top is the method's working memory
    reset_peak_memory(trainer.device)
    for _ in range(3):
        trainer.train_step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        sync()
        times.append(time.perf_counter() - start)
    peak = peak_memory_mb(trainer.device)
    cost = trainer.cost()
    return {
        "step_s": statistics.median(times),
        "mem_mb": peak if device == "cuda" else peak - baseline,
        "fwd": cost["cost/fwd_per_sample"],
        "jvp": cost["cost/jvp_per_sample"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["mlp", "unet"], default="mlp")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--batch", type=int, help="default: 4096 for the MLP, 64 for the UNet")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method and print JSON
    args = parser.parse_args()
    args.batch = args.batch or (4096 if args.model == "mlp" else 64)
    shape = (args.model, args.width, args.depth, args.channels, args.batch, args.steps, args.device)
    if args.one:
        print(json.dumps(measure(args.one, *shape)))
        return
    from orch.methods.catalog import METHODS

    rows = []
    for method in ["fm", *(name for name in METHODS.names() if name != "fm")]:  # every registered method, FM first
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                method,
                *sum(([f"--{k}", str(v)] for k, v in vars(args).items() if k != "one"), []),
            ],  # fmt: skip
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    fm = rows[0]
    net = f"checker MLP {args.width}x{args.depth}" if args.model == "mlp" else f"MNIST UNet {args.channels} channels"
    print(f"{net}, batch {args.batch}, {args.device}, median of {args.steps} steps")
    print(f"{'method':10} {'ms/step':>8} {'time×FM':>8} {'mem MB':>8} {'mem×FM':>7} {'fwd':>5} {'jvp':>5}  paper B")
    for r in rows:
        paper = PAPER_B.get(r["method"])
        print(
            f"{r['method']:10} {1000 * r['step_s']:8.1f} {r['step_s'] / fm['step_s']:8.2f} {r['mem_mb']:8.1f} "
            f"{r['mem_mb'] / fm['mem_mb']:7.2f} {r['fwd']:5.2f} {r['jvp']:5.2f}  "
            + (f"{paper[0]:.2f}× / {paper[1]:.2f}×" if paper else "")
        )


if __name__ == "__main__":
    main()
