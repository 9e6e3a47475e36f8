"""Sample-quality metrics (docs/methods.md §3.8): KL for 2-D data with a known density, FID for images.

A metric is called with (samples, dataset, the eval config, device) and returns one number, lower is better."""

from __future__ import annotations

import torch
from torch import Tensor

from methods import fid
from methods.datasets import Density2D
from methods.images import ImageDataset
from methods.registry import Registry

METRICS = Registry("metric")

KL_BINS = 50
PSEUDO_COUNT = 0.5


@METRICS.register("kl", requires=("density",))
def kl_metric(samples: Tensor, dataset: Density2D, evaluation, device: torch.device) -> float:
    """KL(target ‖ model) on a 50 × 50 histogram (2-D data with a known density)."""
    return histogram_kl(samples, dataset)


@METRICS.register("fid", requires=("images",))
def fid_metric(samples: Tensor, dataset: ImageDataset, evaluation, device: torch.device) -> float:
    """FID of uint8 samples against the training images (eval.fid_reference of them), torch-fidelity Inception."""
    reference, _ = fid.reference_features(dataset, evaluation.fid_reference, device)
    return fid.fid_kid(fid.features(samples, device), reference)["fid"]


def histogram_kl(samples: Tensor, dataset: Density2D, bins: int = KL_BINS) -> float:
    """KL(target ‖ model) over a bins × bins histogram of the dataset's square.

    Direction: KL(ρ_data ‖ ρ_model) = Σ_i p_i log(p_i / q_i), the only direction that stays finite when model
    samples land in empty cells. p_i is the target's exact mass of cell i (Density2D.bin_masses), so cells cut
    by a square edge are handled exactly. q_i = (c_i + ½)/(N + ½·bins²) from the N model samples (the
    Krichevsky–Trofimov pseudo-count keeps the estimate finite; samples outside the square count in N, so mass
    the model puts outside lowers every q_i). A perfect sampler scores ≈ (K − 1)/(2N) > 0 from finite N
    (K = number of cells with mass), so compare runs at the same `eval.num_samples`.
    """
    lo, hi = dataset.bounds
    x = samples.detach().double().cpu()
    x = x[torch.isfinite(x).all(1)]
    idx = torch.floor((x - lo) / (hi - lo) * bins).long()
    inside = ((idx >= 0) & (idx < bins)).all(1)
    counts = torch.bincount(idx[inside, 0] * bins + idx[inside, 1], minlength=bins * bins).double()
    q = (counts + PSEUDO_COUNT) / (samples.shape[0] + PSEUDO_COUNT * bins * bins)
    p = dataset.bin_masses(bins).reshape(-1)
    mask = p > 0
    return float((p[mask] * (p[mask] / q[mask]).log()).sum())
