"""KL for 2-D data with a known density (docs/methods.md §3.8): unconditional and per class."""

from __future__ import annotations

import torch
from torch import Tensor

from orch.methods.data.base import Density2D
from orch.methods.evaluation.metric import register_metric

KL_BINS = 50


PSEUDO_COUNT = 0.5


@register_metric("kl", direction="min", title="KL(data ‖ model), 50×50 histogram", requires=("density",))
def kl_metric(samples: Tensor, dataset: Density2D, evaluation, device: torch.device) -> float:
    """KL(target ‖ model) on a 50 × 50 histogram (2-D data with a known density)."""
    return histogram_kl(samples, dataset)


@register_metric(
    "kl_cond",
    direction="min",
    title="mean over classes of KL(class density ‖ class samples), 50×50 histograms",
    requires=("density", "classes"),
    labelled=True,
)
def kl_cond_metric(samples: Tensor, dataset: Density2D, evaluation, device: torch.device, labels: Tensor) -> float:
    """Class-conditional KL: the mean over classes of KL(exact class density ‖ the samples of that class), each
    on a 50 × 50 histogram (2-D data with known class densities, e.g. the gmm's components)."""
    labels, masses = labels.to(samples.device), dataset.class_bin_masses(KL_BINS)
    kls = [histogram_kl(samples[labels == k], dataset, masses=masses[..., k]) for k in range(dataset.num_classes)]
    return float(sum(kls) / len(kls))


def histogram_kl(samples: Tensor, dataset: Density2D, bins: int = KL_BINS, masses: Tensor | None = None) -> float:
    """KL(target ‖ model) over a bins × bins histogram of the dataset's square.

    Direction: KL(ρ_data ‖ ρ_model) = Σ_i p_i log(p_i / q_i), the only direction that stays finite when model
    samples land in empty cells. p_i is the target's exact mass of cell i (Density2D.bin_masses), so cells cut
    by a square edge are handled exactly. q_i = (c_i + ½)/(N + ½·bins²) from the N model samples (the
    Krichevsky–Trofimov pseudo-count keeps the estimate finite; samples outside the square count in N, so mass
    the model puts outside lowers every q_i). A perfect sampler scores ≈ (K − 1)/(2N) > 0 from finite N
    (K = number of cells with mass), so compare runs at the same `eval.num_samples`. `masses`: the target's cell
    masses (default: the dataset's density).
    """
    lo, hi = dataset.bounds
    x = samples.detach().double().cpu()
    x = x[torch.isfinite(x).all(1)]
    idx = torch.floor((x - lo) / (hi - lo) * bins).long()
    inside = ((idx >= 0) & (idx < bins)).all(1)
    counts = torch.bincount(idx[inside, 0] * bins + idx[inside, 1], minlength=bins * bins).double()
    q = (counts + PSEUDO_COUNT) / (samples.shape[0] + PSEUDO_COUNT * bins * bins)
    p = (dataset.bin_masses(bins) if masses is None else masses).reshape(-1)
    mask = p > 0
    return float((p[mask] * (p[mask] / q[mask]).log()).sum())
