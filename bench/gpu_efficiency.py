"""Benchmark: how well each trial of a study uses the hardware, at fp32, bf16 and bf16 + torch.compile, side by side.

For each trial (after --profile) and each variant, builds the trainer exactly as a trial does with
train.precision and train.compile set, runs warm-up steps (compilation happens there), then times --steps
training steps and prints sec/kimg, images/s, peak memory (CUDA max allocated; the process's peak RSS on CPU)
and MFU: the FLOPs of one training sample, counted by torch.utils.flop_counter over the method's actual step
(its forward, JVP, teacher and backward passes; matrix products, convolutions and attention), times samples/s,
divided by the device's dense peak for that precision. Ratios are to the trial's fp32 row of the same run. Then
sampling images/s per variant and, for image datasets, Inception feature throughput in fp32 and bf16 with the
FID difference bf16 makes (between two disjoint halves of --fid-images dataset images, and between the
benchmark network's fp32 and bf16 samples against the same reference).

python bench/gpu_efficiency.py studies/cifar10_selfdistill.yaml --profile gpu_check --synthetic --batch 512
python bench/gpu_efficiency.py tests/studies/tiny.yaml --device cpu --steps 5 --peak-tflops 1   # CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.image_cost import build, inception, synchronize, synthetic_cifar, timed_steps  # noqa: E402
from orch.execution.build import build_section  # noqa: E402
from orch.methods.data.images import ImageDataset, subset  # noqa: E402
from orch.methods.evaluation import fid  # noqa: E402
from orch.methods.evaluation.generation import EvalConfig, generate  # noqa: E402
from orch.methods.runtime.precision import autocast  # noqa: E402
from orch.methods.training.trainer import peak_memory_mb  # noqa: E402
from orch.study.load import load_study  # noqa: E402

VARIANTS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16+compile": ("bf16", True)}
"""Variant name: (train.precision, train.compile)."""

DENSE_PEAK_TFLOPS = {  # vendors' datasheet peaks without structured sparsity; first matching name wins
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def peak_flops(device: torch.device, precision: str, override_tflops: float | None) -> float | None:
    """The device's dense peak FLOP/s at `precision`: --peak-tflops when given, else the table (None if the
    device is not in it, e.g. any CPU)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in DENSE_PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision] * 1e12
    return None


def with_variant(config: dict, precision: str, compile_: bool, device: torch.device) -> dict:
    return config | {"train": config["train"] | {"precision": precision, "compile": compile_, "device": device.type}}


FLOP_BATCH = 64
"""Batch of the FLOP count: FLOPs are linear in the batch, and the methods' batch fractions (e.g. LSD's 3/4 on
the diagonal) split 64 exactly, so a per-sample count at 64 is the count at any larger batch, without its memory."""


def flops_per_sample(config: dict, device: torch.device, steps: int = 3) -> float:
    """FLOPs of one training sample: counted over `steps` eager fp32 training steps (after one uncounted step)
    and divided by the samples they trained on. Precision and compilation change the time, not the count."""
    batch = min(config["train"]["batch_size"], FLOP_BATCH)
    config = config | {"train": config["train"] | {"batch_size": batch, "micro_batches": 1}}
    trainer = build(with_variant(config, "fp32", False, device), device)
    trainer.train_step()
    with FlopCounterMode(display=False) as counter:
        for _ in range(steps):
            trainer.train_step()
    return counter.get_total_flops() / (steps * batch)


def step_cost(config: dict, device: torch.device, steps: int, warmup: int) -> tuple[dict, object]:
    """Median step time, throughput and peak memory of one trainer; returns the trainer for the sampling test."""
    trainer = build(config, device)
    step = statistics.median(timed_steps(trainer, device, steps, warmup))
    batch = config["train"]["batch_size"]
    return {"step_s": step, "sec_per_kimg": step / (batch / 1000), "samples_per_s": batch / step,
            "mem_mb": peak_memory_mb(device)}, trainer  # fmt: skip


def draw(trainer, config: dict, precision: str, nfe: int, device: torch.device) -> torch.Tensor:
    """eval.batch_size nfe-step samples from the trainer's EMA network at `precision`, seed 0."""
    evaluation = EvalConfig.model_validate(config["eval"])
    update = {"num_samples": evaluation.batch_size, "nfe": [nfe], "precision": precision}
    evaluation = evaluation.model_copy(update=update)
    args = (trainer.method, trainer.ema_net(), trainer.interpolant, trainer.dataset, evaluation, nfe, 0, device)
    return generate(*args)


def sampling_rate(trainer, config: dict, precision: str, device: torch.device, nfe: int = 1) -> float:
    """Images (or points) per second of nfe-step sampling, one batch of eval.batch_size after a warm-up."""
    draw(trainer, config, precision, nfe, device)
    synchronize(device)
    start = time.perf_counter()
    samples = draw(trainer, config, precision, nfe, device)
    synchronize(device)
    return len(samples) / (time.perf_counter() - start)


def inception_features(model, images: torch.Tensor, precision: str, device: torch.device, batch: int = 100):
    """Pool3 features (N, 2048) of uint8 images under `precision`'s autocast, and the images/s it took."""
    with torch.no_grad(), autocast(precision, device):
        model(images[:batch].to(device).expand(-1, 3, -1, -1))  # warm-up
        synchronize(device)
        start = time.perf_counter()
        feats = [model(chunk.to(device).expand(-1, 3, -1, -1))[0].float() for chunk in images.split(batch)]
        synchronize(device)
    return torch.cat(feats).double().cpu(), len(images) / (time.perf_counter() - start)


def inception_precision(dataset: ImageDataset, device: torch.device, count: int, random_weights: bool) -> dict:
    """Inception images/s in fp32 and bf16, and the FID between two disjoint halves of `count` dataset images
    with each (their difference is what bf16 features change; skipped with random weights)."""
    model = inception(device, random_weights)
    images = subset(dataset.images, count)
    half = len(images) // 2
    out = {}
    for precision in ("fp32", "bf16"):
        feats, rate = inception_features(model, images, precision, device)
        out[f"inception_img_per_s_{precision}"] = rate
        if not random_weights:
            out[f"fid_halves_{precision}"] = fid.fid_between(feats[:half], feats[half:])
    return out


def sample_fid_delta(trainer, config: dict, device: torch.device, random_weights: bool) -> dict:
    """FID of the network's 1-step fp32 samples and bf16 samples (same seeds) against the same dataset images,
    with fp32 Inception features."""
    if random_weights:
        return {}
    model = inception(device, False)
    count = config["eval"]["batch_size"]
    reference, _ = inception_features(model, subset(trainer.dataset.images, count), "fp32", device)
    out = {}
    for precision in ("fp32", "bf16"):
        feats, _ = inception_features(model, draw(trainer, config, precision, 1, device), "fp32", device)
        out[f"sample_fid_{precision}"] = fid.fid_between(feats, reference)
    return out


def free(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()  # compiled graphs of the previous trainer hold its parameters
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_trial(config: dict, variants: list[str], device: torch.device, args) -> dict:
    """One trial's rows (one per variant) plus its FLOP count and evaluation-precision figures."""
    flops = flops_per_sample(config, device)
    rows = {}
    for name in variants:
        precision, compile_ = VARIANTS[name]
        variant = with_variant(config, precision, compile_, device)
        try:
            row, trainer = step_cost(variant, device, args.steps, args.warmup)
        except torch.OutOfMemoryError:
            rows[name] = None
            free(device)
            continue
        peak = peak_flops(device, precision, args.peak_tflops)
        row["tflops_per_s"] = flops * row["samples_per_s"] / 1e12
        row["mfu"] = None if peak is None else flops * row["samples_per_s"] / peak
        row["sample_per_s_nfe1"] = sampling_rate(trainer, variant, precision, device)
        if name == "fp32" and isinstance(trainer.dataset, ImageDataset) and args.fid_images:
            row |= sample_fid_delta(trainer, variant, device, args.random_inception)
        rows[name] = row
        del trainer
        free(device)
    return {"gflop_per_sample": flops / 1e9, "variants": rows}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def print_report(title: str, results: dict, variants: list[str], inception_row: dict | None) -> None:
    print(f"\n{title}")
    header = (
        f"{'trial':20} {'variant':13} {'GFLOP/img':>9} {'ms/step':>8} {'sec/kimg':>9} {'img/s':>8} {'TFLOP/s':>8} "
        f"{'MFU':>6} {'×speed':>6} {'peak MB':>9} {'×mem':>5} {'sample/s@1':>10}"
    )
    print(header)
    for label, result in results.items():
        base = result["variants"].get("fp32")
        for name in variants:
            r = result["variants"].get(name)
            if r is None:
                print(f"{label:20} {name:13} out of memory")
                continue
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            speed = f"{base['step_s'] / r['step_s']:.2f}" if base else "n/a"
            mem = f"{r['mem_mb'] / base['mem_mb']:.2f}" if base else "n/a"
            print(
                f"{label:20} {name:13} {result['gflop_per_sample']:9.4g} {1000 * r['step_s']:8.1f} "
                f"{r['sec_per_kimg']:9.3f} {r['samples_per_s']:8.0f} {r['tflops_per_s']:8.3g} {mfu:>6} "
                f"{speed:>6} {r['mem_mb']:9.0f} {mem:>5} {r['sample_per_s_nfe1']:10.0f}"
            )
        if base and "sample_fid_fp32" in base:
            fids = f"{base['sample_fid_fp32']:.3f} / {base['sample_fid_bf16']:.3f}"
            print(f"{'':20} 1-step sample FID, fp32 / bf16 sampling: {fids}")
    if inception_row:
        rates = f"{inception_row['inception_img_per_s_fp32']:.0f} / {inception_row['inception_img_per_s_bf16']:.0f}"
        print(f"Inception features, images/s fp32 / bf16: {rates}")
        if "fid_halves_fp32" in inception_row:
            halves = f"{inception_row['fid_halves_fp32']:.4f} / {inception_row['fid_halves_bf16']:.4f}"
            print(f"FID between two halves of the dataset images, fp32 / bf16 Inception: {halves}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("study")
    parser.add_argument("--profile")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--batch", type=int, help="override train.batch_size")
    parser.add_argument("--micro-batches", type=int, help="override train.micro_batches")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak (needed for MFU on a CPU)")
    parser.add_argument("--synthetic", action="store_true", help="random images in CIFAR-10's file format")
    parser.add_argument("--random-inception", action="store_true", help="time Inception with random weights")
    parser.add_argument("--fid-images", type=int, default=2000, help="images for the FID comparisons (0: none)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    device = torch.device(args.device)
    study = load_study(args.study, args.profile)
    tmp = tempfile.TemporaryDirectory()
    if args.synthetic:
        synthetic_cifar(Path(tmp.name))
    results, dataset = {}, None
    for trial in study.trials:
        config = trial.config
        if args.synthetic:
            config = config | {"dataset": config["dataset"] | {"root": tmp.name}}
        overrides = {"batch_size": args.batch, "micro_batches": args.micro_batches}
        config = config | {"train": config["train"] | {k: v for k, v in overrides.items() if v is not None}}
        print(f"{trial.label}: {', '.join(variants)} × {args.steps} steps ...", flush=True)
        results[trial.label] = measure_trial(config, variants, device, args)
        dataset = dataset or build_section(config, "dataset")
    inception_row = None
    if isinstance(dataset, ImageDataset) and args.fid_images:
        inception_row = inception_precision(dataset, device, args.fid_images, args.random_inception)
    first = study.trials[0].config["train"]
    batch = args.batch or first["batch_size"]
    title = (
        f"{study.name} ({study.profile or 'default'} profile), batch {batch}, {device_name(device)}, "
        f"torch {torch.__version__}; median of {args.steps} steps after {args.warmup} warm-up steps"
    )
    print_report(title, results, variants, inception_row)
    if args.json:
        figures = {"device": device_name(device), "torch": torch.__version__, "trials": results}
        args.json.write_text(json.dumps(figures | {"inception": inception_row}, indent=1))


if __name__ == "__main__":
    main()
