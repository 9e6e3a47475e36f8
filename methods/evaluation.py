"""Evaluation: samples from a network with a method's own sampler, scored by the registered metrics (used by the
trainer's periodic evaluations and by the evaluation of stored checkpoints)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, NonNegativeInt, PositiveInt
from torch import Tensor, nn

from methods.images import ImageDataset, to_uint8
from methods.interpolants import LinearInterpolant
from methods.metrics import metric
from methods.registry import MAX_NFE, Batch, Params, Samples
from methods.terms import Method

Decay = Annotated[float, Field(gt=0.0, lt=1.0)]
"""An EMA decay."""


class EvalConfig(Params):
    """The `eval` section: when and how sample quality is measured (it never changes a trial's identity)."""

    every: PositiveInt = 1000
    """Steps between evaluations; the last step is always evaluated."""
    nfe: Annotated[list[Annotated[int, Field(gt=0, le=MAX_NFE)]], Field(min_length=1)] = [1, 2, 4, 8, 16]
    """Sampling step counts evaluated (network evaluations per sample)."""
    metrics: Annotated[list[str], Field(min_length=1)] = ["kl"]
    """Registered metrics: `kl` (2-D data with a known density), `fid` (images), or an installed one."""
    num_samples: Samples = 20000
    """Samples generated per step count and evaluation."""
    ema: Decay | None = None
    """Which EMA copy generates samples; null = the first of train.ema."""
    batch_size: Batch = 1000
    """Samples generated per network call during evaluation (memory, not results, depends on it)."""
    fid_reference: Samples | None = None
    """FID reference: this many training images (a fixed subset; null: all of them, as the papers do)."""
    grid: NonNegativeInt = 64
    """Images in the sample grid logged per NFE at each evaluation (image datasets; 0: none)."""


PREVIEW_POINTS = 1000
"""Samples of a low-dimensional dataset kept per NFE at each evaluation, for the dashboard's scatter plots."""
BASE_SEED, RENOISE_SEED = 1_000_003, 2_000_003
"""Offsets from train.seed of the generators of the base noise and of a sampler's fresh noise."""


@torch.no_grad()
def generate(
    method: Method,
    net: nn.Module,
    interpolant: LinearInterpolant,
    dataset,
    evaluation: EvalConfig,
    nfe: int,
    seed: int,
    device: torch.device,
) -> Tensor:
    """eval.num_samples samples of `net` with the method's sampler at `nfe`, in chunks of eval.batch_size, from
    the same base noise at every NFE and every evaluation (a sampler that re-noises draws from a generator of
    its own, so the base noise stays the same); image samples come back as uint8 pixels on the CPU.
    Shape: (num_samples, *data_shape)."""
    base = torch.Generator(device).manual_seed(seed + BASE_SEED)
    renoise = torch.Generator(device).manual_seed(seed + RENOISE_SEED)
    chunks = []
    for start in range(0, evaluation.num_samples, evaluation.batch_size):
        n = min(evaluation.batch_size, evaluation.num_samples - start)
        x = method.sample(net, interpolant.sample_base(n, dataset.shape, base), nfe, renoise)
        chunks.append(to_uint8(x).cpu() if isinstance(dataset, ImageDataset) else x)
    return torch.cat(chunks)


def evaluate(
    method: Method,
    net: nn.Module,
    interpolant: LinearInterpolant,
    dataset,
    evaluation: EvalConfig,
    seed: int,
    device: torch.device,
) -> tuple[dict[str, float], dict[int, Tensor]]:
    """Each metric at each NFE (`eval/<metric>/nfe_<N>`), and a preview of the samples per NFE: the first
    eval.grid images (uint8, (n, C, H, W)) of an image dataset, the first PREVIEW_POINTS points otherwise."""
    results, previews = {}, {}
    for nfe in evaluation.nfe:
        samples = generate(method, net, interpolant, dataset, evaluation, nfe, seed, device)
        for name in evaluation.metrics:
            results[f"eval/{name}/nfe_{nfe}"] = metric(name)(samples, dataset, evaluation, device)
        images = isinstance(dataset, ImageDataset)
        if count := evaluation.grid if images else PREVIEW_POINTS:
            previews[nfe] = samples[:count].detach().cpu()
    return results, previews
