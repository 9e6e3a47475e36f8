"""Benchmark: training cost of an image study's trials on one device, plus sampling and FID-feature throughput.

For each trial of the study (after --profile), builds its trainer exactly as a trial does, runs a few warm-up
steps, then times --steps training steps and prints sec/kimg, samples/s, peak memory (CUDA max allocated, or
the process's peak RSS on CPU), and measured network evaluations per sample, with time and memory as ratios to
the first trial. Then the time to generate images at 1, 2 and 4 steps with the trial's network, and the
throughput of torch-fidelity's Inception feature extractor.

--synthetic trains on random images written in the dataset's own file format (CIFAR-10 "python" batches) when
the real files are not at hand: cost does not depend on pixel values. --random-inception times the extractor
with random weights of the same network when the FID weights file is not at hand (timing only; never a FID).

python bench/image_cost.py studies/cifar10_selfdistill.yaml --profile gpu_check --steps 200 --synthetic
"""

from __future__ import annotations

import argparse
import gc
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orch.execution.build import build_network, build_trainer, needs_teacher  # noqa: E402
from orch.methods.evaluation.generation import generate  # noqa: E402
from orch.methods.training.trainer import EvalConfig, peak_memory_mb, reset_peak_memory  # noqa: E402
from orch.study.load import load_study  # noqa: E402
from orch.trial.typed import TrialConfig


def synthetic_cifar(root: Path, per_batch: int = 10000) -> None:
    """Random images in CIFAR-10's on-disk format (five training batches and the test batch)."""
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), b"labels": [0] * per_batch}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(config: dict, device: torch.device):
    """The trial's trainer, as run_trial builds it; a distillation method gets an untrained teacher of the
    configured network (any frozen net costs the same)."""
    teacher = build_network(TrialConfig.parse(config)) if needs_teacher(config["method"]) else None
    return build_trainer(TrialConfig.parse(config), device, teacher)


def timed_steps(trainer, device: torch.device, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` training steps after `warmup` untimed ones; peak memory is reset in between."""
    for _ in range(warmup):
        trainer.train_step()
    synchronize(device)
    gc.collect()
    reset_peak_memory(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def train_cost(config: dict, device: torch.device, steps: int, warmup: int = 5) -> dict:
    trainer = build(config, device)
    times = timed_steps(trainer, device, steps, warmup)
    step = statistics.median(times)
    cost = trainer.cost()
    batch = config["train"]["batch_size"]
    row = {
        "step_s": step,
        "sec_per_kimg": step / (batch / 1000),
        "samples_per_s": batch / step,
        "mem_mb": peak_memory_mb(device),
        "fwd": cost["cost/fwd_per_sample"],
        "jvp": cost["cost/jvp_per_sample"],
        "wall_s": sum(times),
    }
    evaluation = EvalConfig.model_validate(config["eval"])
    n = evaluation.batch_size
    for nfe in (1, 2, 4):
        evaluation_n = evaluation.model_copy(update={"num_samples": n, "nfe": [nfe]})
        args = (trainer.method, trainer.ema_net(), trainer.interpolant, trainer.dataset, evaluation_n, nfe, 0, device)
        generate(*args)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        generate(*args)
        synchronize(device)
        row[f"img_per_s_nfe{nfe}"] = n / (time.perf_counter() - start)
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def inception(device: torch.device, random_weights: bool) -> torch.nn.Module:
    """torch-fidelity's FID Inception; with random_weights, the same network with random parameters (the cost
    is the same; for timing only, when the weights file is not at hand)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from orch.methods.evaluation import fid

    if not random_weights:
        return fid.extractor(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.pth"
        torch.save({k: torch.rand(shape) for k, shape in fid.fidelity_layout().items()}, path)
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(path)).to(device)


def inception_throughput(device: torch.device, random_weights: bool, n: int = 1000, batch: int = 100) -> float:
    """Images per second through the extractor (32×32 uint8 inputs, resized to 299×299 inside)."""
    model = inception(device, random_weights)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        model(images[:batch].to(device))  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for chunk in images.split(batch):
            model(chunk.to(device))
        synchronize(device)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("study")
    parser.add_argument("--profile")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, help="override train.batch_size")
    parser.add_argument("--micro-batches", type=int, help="override train.micro_batches (gradient accumulation)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--synthetic", action="store_true", help="random images in CIFAR-10's file format")
    parser.add_argument("--random-inception", action="store_true", help="time the extractor with random weights")
    args = parser.parse_args()
    device = torch.device(args.device)
    study = load_study(args.study, args.profile)
    tmp = tempfile.TemporaryDirectory()
    if args.synthetic:
        synthetic_cifar(Path(tmp.name))
    rows = []
    first = study.trials[0].config["train"]
    train = {
        "batch_size": args.batch or first["batch_size"],
        "micro_batches": args.micro_batches or first["micro_batches"],
    }
    for trial in study.trials:
        config = trial.config
        if args.synthetic:
            config = config | {"dataset": config["dataset"] | {"root": tmp.name}}
        config = config | {"train": config["train"] | train | {"device": device.type}}
        print(f"{trial.label}: {args.steps} steps ...", flush=True)
        try:
            rows.append((trial.label, train_cost(config, device, args.steps)))
        except torch.OutOfMemoryError:
            rows.append((trial.label, None))
            gc.collect()
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    title = f"{study.name} ({study.profile or 'default'} profile)"
    batch = f"batch {train['batch_size']} in {train['micro_batches']} micro-batches"
    print(f"\n{title}, {batch}, {name}, torch {torch.__version__}")
    print(
        f"median of {args.steps} steps after 5 warm-up steps" + (", synthetic CIFAR-10 files" if args.synthetic else "")
    )
    base = next(r for _, r in rows if r is not None)
    header = f"{'trial':24} {'ms/step':>8} {'sec/kimg':>9} {'img/s':>8} {'×time':>6} {'peak MB':>9} {'×mem':>5}"
    print(header + f" {'fwd':>5} {'jvp':>5} {'gen img/s @1/2/4 steps':>24}")
    for label, r in rows:
        if r is None:
            print(f"{label:24} out of memory")
            continue
        gen = "/".join(f"{r[f'img_per_s_nfe{k}']:.0f}" for k in (1, 2, 4))
        print(
            f"{label:24} {1000 * r['step_s']:8.1f} {r['sec_per_kimg']:9.3f} {r['samples_per_s']:8.0f} "
            f"{r['step_s'] / base['step_s']:6.2f} {r['mem_mb']:9.0f} {r['mem_mb'] / base['mem_mb']:5.2f} "
            f"{r['fwd']:5.2f} {r['jvp']:5.2f} {gen:>24}"
        )
    rate = inception_throughput(device, args.random_inception)
    kind = "random weights, timing only" if args.random_inception else "FID weights"
    print(f"Inception feature extraction (32×32 → 299×299, batch 100, {kind}): {rate:.0f} images/s")


if __name__ == "__main__":
    main()
