"""Evaluation: samples from a network with a method's own sampler, scored by the registered metrics (used by the
trainer's periodic evaluations and by the evaluation of stored checkpoints)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, NonNegativeInt, PositiveInt
from torch import Tensor, nn

from orch.methods.contracts.counting import CountingNet, Counts
from orch.methods.contracts.guidance import Condition, GuidedNet, normalised_omega, num_classes_of
from orch.methods.contracts.interpolants import LinearInterpolant
from orch.methods.contracts.method import Method
from orch.methods.contracts.metric_keys import eval_key, eval_suffix
from orch.methods.contracts.registry import MAX_NFE, Batch, Params, Samples
from orch.methods.data.images import ImageDataset
from orch.methods.evaluation.metric import metric, share_feature_passes
from orch.methods.runtime.parallel import Gen, ShardedGenerator, gather_rows, world_of
from orch.methods.runtime.precision import at_least_fp32, autocast

Decay = Annotated[float, Field(gt=0.0, lt=1.0)]
"""An EMA decay."""
MAX_GUIDANCE = 100.0
"""Upper bound of a guidance scale (the papers use ω ≤ 10)."""


class EvalConfig(Params):
    """The `eval` section: when and how sample quality is measured (it never changes a trial's identity)."""

    every: PositiveInt = 1000
    """Steps between evaluations; the last step is always evaluated."""
    nfe: Annotated[list[Annotated[int, Field(gt=0, le=MAX_NFE)]], Field(min_length=1)] = [1, 2, 4, 8, 16]
    """Sampling step counts evaluated (network evaluations per sample)."""
    metrics: Annotated[list[str], Field(min_length=1)] = ["kl"]
    """Registered metrics: `kl` (2-D data with a known density), `kl_cond` (its classes), `fid`, `kid`, `is`,
    `precision`, `recall` (images), or an installed one."""
    num_samples: Samples = 20000
    """Samples generated per step count and evaluation."""
    ema: Decay | None = None
    """Which EMA copy generates samples; null = the first of train.ema."""
    batch_size: Batch = 1000
    """Samples generated per network call during evaluation (memory, not results, depends on it)."""
    fid_reference: Samples | None = None
    """FID reference: this many training images (a fixed subset; null: all of them, as the papers do)."""
    fid_statistics: str | None = None
    """FID against precomputed reference statistics instead of the training images: ADM's reference batch
    (`.npz` with `mu`, `sigma`, e.g. VIRTUAL_imagenet256_labeled.npz) or a torch-fidelity statistics file
    (`.pt`, {"mu", "sigma"}) of pool3 features; the file's SHA-256 is part of FID's fingerprint. KID,
    precision and recall still compare with the training images."""
    grid: NonNegativeInt = 64
    """Images in the sample grid logged per NFE at each evaluation (image datasets; 0: none). Conditional data:
    one row per class, ⌈grid / classes⌉ images each."""
    guidance: Annotated[list[Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE)]], Field(min_length=1)] = [1.0]
    """Classifier-free guidance scales ω measured (conditional data): ω = 1 is the conditional model itself,
    logged as `eval/<metric>/nfe_<N>`; any other ω as `eval/<metric>/nfe_<N>/cfg_<ω>`."""
    guidance_interval: (
        Annotated[list[Annotated[float, Field(ge=0.0, le=1.0)]], Field(min_length=2, max_length=2)] | None
    ) = None
    """[τ_lo, τ_hi]: guide only steps whose start time τ lies inside (orch's time, 0 = noise, 1 = data); null:
    every step."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Numerics of the sampling passes (autocast; the metrics' own networks, e.g. Inception, stay fp32). fp32 by
    default: the papers' numbers are fp32 samples (bf16's effect on FID: docs/performance.md)."""
    metric_options: dict[str, dict[str, Any]] = {}
    """Options of the metrics that declare their own (`orch describe metric` lists them): metric name → its
    options, e.g. {my_metric: {k: 5}}; part of that metric's fingerprint."""


PREVIEW_POINTS = 1000
"""Samples of a low-dimensional dataset kept per NFE at each evaluation, for the dashboard's scatter plots."""
BASE_SEED, RENOISE_SEED, LABEL_SEED = 1_000_003, 2_000_003, 3_000_003
"""Offsets from train.seed of the generators of the base noise, of a sampler's fresh noise and of the class
labels of conditional samples."""


class ZeroVelocity(nn.Module):
    """v ≡ 0: drives a sampler once to count the network evaluations it makes."""

    def forward(self, x: Tensor, a: Tensor, b: Tensor, labels=None, omega=None, interval=None) -> Tensor:
        return torch.zeros_like(x)


def sampler_calls(method: Method, nfe: int, omega: float, interval, num_classes: int | None) -> int | None:
    """The step argument of the method's sampler that makes exactly `nfe` counted network evaluations per sample
    at guidance scale ω (two-pass CFG costs 2 per guided call), or None when no argument does.

    Unguided sampling (ω = 1) and a student with embedded guidance cost one evaluation per call, so the step
    argument is nfe itself. Otherwise the sampler is run once per candidate on a single zero-velocity sample
    (its count grows with the argument, so a bisection finds it)."""
    if omega == 1.0 or method.embedded_guidance is not None:
        return nfe

    def cost(calls: int) -> int:  # the count does not depend on the data: one 2-D sample drives the sampler
        counts, condition = Counts(), Condition(labels=torch.zeros(1, dtype=torch.long))
        guided = GuidedNet(CountingNet(ZeroVelocity(), counts, condition), condition, num_classes or 1, omega, interval)
        method.sample(guided, torch.zeros(1, 2), calls, torch.Generator().manual_seed(0))
        return counts.forwards

    lo, hi = 1, nfe
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(mid) < nfe:
            lo = mid + 1
        else:
            hi = mid
    return lo if cost(lo) == nfe else None


def eval_labels(dataset, n: int, seed: int) -> Tensor | None:
    """The classes of n conditional samples, drawn from the dataset's class frequencies with a generator of their
    own (the same labels at every NFE, scale and evaluation); None for unconditional data. Shape (n,)."""
    if num_classes_of(dataset) is None:
        return None
    gen = torch.Generator().manual_seed(seed + LABEL_SEED)
    return torch.multinomial(dataset.class_frequencies().double(), n, replacement=True, generator=gen)


def sampling_net(method: Method, net: nn.Module, dataset, labels: Tensor | None, omega: float, interval) -> nn.Module:
    """What the sampler evaluates: the network at these labels, through two-pass CFG at ω ≠ 1, or with the
    normalised ω (and the guidance interval, [0, 1] when None) as its inputs when the method embeds guidance."""
    embedded = method.embedded_guidance
    condition = Condition(labels=labels)
    if embedded is not None:
        condition.omega = torch.full(labels.shape, float(normalised_omega(omega, embedded)), device=labels.device)
    if method.embedded_interval:
        ends = torch.tensor(interval or [0.0, 1.0], device=labels.device)
        condition.interval = ends.expand(len(labels), 2)
    counted = CountingNet(net, condition=condition, takes_omega=embedded is not None)
    if labels is None or omega == 1.0 or embedded is not None:
        return counted
    return GuidedNet(counted, condition, dataset.num_classes, omega, interval)


@torch.no_grad()
def generate_chunks(
    method: Method,
    net: nn.Module,
    interpolant: LinearInterpolant,
    dataset,
    evaluation: EvalConfig,
    nfe: int,
    seed: int,
    device: torch.device,
    omega: float = 1.0,
    labels: Tensor | None = None,
) -> Iterator[Tensor]:
    """eval.num_samples samples of `net` with the method's sampler at `nfe` evaluations per sample and guidance
    scale ω, one chunk of eval.batch_size at a time, from the same base noise at every NFE, scale and evaluation
    (a sampler that re-noises draws from a generator of its own, so the base noise stays the same); conditional
    samples have the classes `labels` (num_samples,). Image samples come as uint8 pixels on the CPU.
    Shape of each chunk: (≤ batch_size, *data_shape).

    Data-parallel (every rank calls it): each rank samples its strided rows of every chunk, from its rows of
    the same noise (methods/runtime/parallel.py), and every rank gets the gathered chunk; when eval.batch_size or
    eval.num_samples does not split equally over the ranks, rank 0 samples alone and the others get nothing."""
    rank, world = world_of()
    shard = sharded_evaluation(evaluation, world)
    if world > 1 and not shard and rank != 0:
        return
    base: Gen = torch.Generator(device).manual_seed(seed + BASE_SEED)
    renoise: Gen = torch.Generator(device).manual_seed(seed + RENOISE_SEED)
    if shard:
        base, renoise = ShardedGenerator(base, rank, world), ShardedGenerator(renoise, rank, world)
    calls = sampler_calls(method, nfe, omega, evaluation.guidance_interval, num_classes_of(dataset))
    if calls is None:
        raise ValueError(f"NFE {nfe} is not reachable by this sampler with two-pass guidance at ω = {omega:g}")
    mine = slice(rank, None, world) if shard else slice(None)
    for start in range(0, evaluation.num_samples, evaluation.batch_size):
        count = min(evaluation.batch_size, evaluation.num_samples - start)
        n = count // world if shard else count
        chunk_labels = None if labels is None else labels[start : start + count][mine].to(device)
        sampler_net = sampling_net(method, net, dataset, chunk_labels, omega, evaluation.guidance_interval)
        with autocast(evaluation.precision, device):
            x = method.sample(sampler_net, interpolant.sample_base(n, dataset.shape, base), calls, renoise)
        x = x.to(at_least_fp32(x))
        if shard:
            x = gather_rows(x, world)
        yield dataset.to_images(x) if isinstance(dataset, ImageDataset) else x


def sharded_evaluation(evaluation: EvalConfig, world: int) -> bool:
    """Whether data-parallel ranks share the sampling: every chunk must split equally over them."""
    return world > 1 and evaluation.batch_size % world == 0 and evaluation.num_samples % world == 0


def generate(*args, **kwargs) -> Tensor | None:
    """All of generate_chunks(*args, **kwargs) at once (None on a data-parallel rank that gets no samples).
    Shape: (num_samples, *data_shape)."""
    chunks = list(generate_chunks(*args, **kwargs))
    return torch.cat(chunks) if chunks else None


def class_grid_labels(num_classes: int, grid: int) -> Tensor:
    """Labels of a per-class grid: ⌈grid / classes⌉ samples of class 0, then of class 1, … (one row each)."""
    return torch.arange(num_classes).repeat_interleave(-(-grid // num_classes))


def evaluate(
    method: Method,
    net: nn.Module,
    interpolant: LinearInterpolant,
    dataset,
    evaluation: EvalConfig,
    seed: int,
    device: torch.device,
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Each metric at each NFE and guidance scale (`eval/<metric>/<suffix>`, suffix `nfe_<N>` at ω = 1 and
    `nfe_<N>/cfg_<ω>` otherwise), and a preview of the samples per suffix: the first eval.grid images (uint8,
    (n, C, H, W)) of an image dataset, one row per class for conditional images, the first PREVIEW_POINTS
    points otherwise.

    Data-parallel: every rank calls it and shares the sampling (generate_chunks) and the Inception pass of the
    image metrics; rank 0 alone scores the samples and keeps the previews (the others return two empty dicts).
    A metric that fails on rank 0 is raised after the last sampling, so that no rank waits in a collective the
    others never reach."""
    results, previews, failure = {}, {}, None
    rank, world = world_of()
    lead, shared = rank == 0, sharded_evaluation(evaluation, world)
    labels = eval_labels(dataset, evaluation.num_samples, seed)
    images = isinstance(dataset, ImageDataset)
    for omega in evaluation.guidance:
        for nfe in evaluation.nfe:
            suffix = eval_suffix(nfe, omega)
            samples = generate(method, net, interpolant, dataset, evaluation, nfe, seed, device, omega, labels)
            if shared:
                share_feature_passes(evaluation.metrics, samples, device)
            for name in evaluation.metrics if lead and failure is None else ():
                try:
                    results[eval_key(name, nfe, omega)] = metric(name)(samples, dataset, evaluation, device, labels)
                except Exception as e:  # data-parallel: raised once every rank has passed the collectives below
                    if world == 1:
                        raise
                    failure = e
            if images and evaluation.grid and labels is not None:
                grid_labels = class_grid_labels(dataset.num_classes, evaluation.grid)
                grid = evaluation.model_copy(update={"num_samples": len(grid_labels)})
                previews[suffix] = generate(
                    method, net, interpolant, dataset, grid, nfe, seed, device, omega, grid_labels
                )
            elif not lead:
                continue
            elif count := evaluation.grid if images else PREVIEW_POINTS:
                previews[suffix] = samples[:count].detach().cpu()
    if failure is not None:
        raise failure
    return (results, previews) if lead else ({}, {})
