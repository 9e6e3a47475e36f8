"""Sample-quality metrics (docs/methods.md §3.8): KL for 2-D data with a known density; FID, KID, Inception Score
and precision/recall for images.

Each metric is registered as a MetricSpec: how it is computed (from (samples, dataset, eval config, device) to
one number), whether lower or higher is better, what its value depends on besides the samples (its
fingerprint: the eval options it reads, the feature extractor) and how it reads in words."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from methods import fid
from methods.datasets import Density2D
from methods.images import ImageDataset
from methods.registry import Registry

METRICS = Registry("metric")

KL_BINS = 50
PSEUDO_COUNT = 0.5


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric. Calling it computes it: spec(samples, dataset, evaluation, device) -> float.

    Attributes:
        direction: "min" when lower is better, "max" when higher is: what best-checkpoint selection, rankings
            and Pareto fronts follow.
        title: what it measures, in words (the dashboard's "measured as").
        options: the eval options its value depends on besides the sample count and the EMA copy (e.g. FID's
            reference size): part of its fingerprint.
        extractor: the feature extractor it measures with, if any: part of its fingerprint.
        labelled: it also reads each sample's class (compute gets the labels as a fifth argument).
    """

    name: str
    compute: Callable[..., float]
    direction: Literal["min", "max"]
    title: str
    options: tuple[str, ...] = ()
    extractor: str | None = None
    labelled: bool = False

    def __call__(
        self, samples: Tensor, dataset, evaluation, device: torch.device, labels: Tensor | None = None
    ) -> float:
        if self.labelled:
            return self.compute(samples, dataset, evaluation, device, labels)
        return self.compute(samples, dataset, evaluation, device)

    def better(self, value: float, than: float) -> bool:
        return value < than if self.direction == "min" else value > than


def register_metric(
    name: str,
    *,
    direction: Literal["min", "max"],
    title: str,
    requires: tuple[str, ...] = (),
    options: tuple[str, ...] = (),
    extractor: str | None = None,
    labelled: bool = False,
):
    """Register a metric function (samples, dataset, evaluation, device[, labels]) -> float with its spec;
    `requires` are the dataset capabilities it needs (e.g. "density", "images", "classes")."""

    def decorator(compute: Callable[..., float]) -> Callable[..., float]:
        spec = MetricSpec(name, compute, direction, title, options, extractor, labelled)
        METRICS.register(name, requires=requires, doc=compute.__doc__)(spec)
        return compute

    return decorator


def metric(name: str) -> MetricSpec:
    return METRICS.get(name).build


def share_feature_passes(names: list[str], samples: Tensor, device: torch.device) -> None:
    """The Inception pass the metrics `names` share, split over data-parallel ranks: every rank calls it with the
    same samples and passes its rows; rank 0's metrics then find the pass done (fid.sample_outputs)."""
    if any(metric(name).extractor in (fid.EXTRACTOR, fid.LOGITS) for name in names):
        fid.sample_outputs(samples, device, shard=True)


@register_metric("kl", direction="min", title="KL(data ‖ model), 50×50 histogram", requires=("density",))
def kl_metric(samples: Tensor, dataset: Density2D, evaluation, device: torch.device) -> float:
    """KL(target ‖ model) on a 50 × 50 histogram (2-D data with a known density)."""
    return histogram_kl(samples, dataset)


IMAGE_METRIC = {"requires": ("images",), "options": ("fid_reference",), "extractor": fid.EXTRACTOR}
"""What the Inception metrics against the training images share."""


def generated_and_real(samples: Tensor, dataset: ImageDataset, evaluation, device: torch.device):
    """Pool3 features of the samples (computed once per sample set) and of the reference images."""
    reference, _ = fid.reference_features(dataset, evaluation.fid_reference, device)
    return fid.sample_outputs(samples, device)[0], reference


@register_metric("fid", direction="min", title="FID", **IMAGE_METRIC | {"options": ("fid_reference", "fid_statistics")})
def fid_metric(samples: Tensor, dataset: ImageDataset, evaluation, device: torch.device) -> float:
    """FID of uint8 samples against the training images (eval.fid_reference of them), or against the reference
    statistics of eval.fid_statistics; torch-fidelity Inception."""
    if evaluation.fid_statistics is not None:
        return fid.fid_against_statistics(fid.sample_outputs(samples, device)[0], evaluation.fid_statistics)
    return fid.fid_kid(*generated_and_real(samples, dataset, evaluation, device))["fid"]


@register_metric("kid", direction="min", title="KID (unbiased MMD², cubic polynomial kernel)", **IMAGE_METRIC)
def kid_metric(samples: Tensor, dataset: ImageDataset, evaluation, device: torch.device) -> float:
    """KID of uint8 samples against the training images: torch-fidelity's unbiased MMD² over subsets of ≤ 1000."""
    return fid.fid_kid(*generated_and_real(samples, dataset, evaluation, device))["kid"]


@register_metric("is", direction="max", title="Inception Score (10 splits)", requires=("images",), extractor=fid.LOGITS)
def is_metric(samples: Tensor, dataset: ImageDataset, evaluation, device: torch.device) -> float:
    """Inception Score of uint8 samples (torch-fidelity, 10 splits); needs the Inception's classifier weights,
    which orch's offline FID weights lack (a clear error says so)."""
    fid.require_logits()
    return fid.inception_score(fid.sample_outputs(samples, device)[1])


def prc(samples: Tensor, dataset: ImageDataset, evaluation, device: torch.device) -> dict[str, float]:
    generated, real = generated_and_real(samples, dataset, evaluation, device)
    return fid.of_samples(samples, "prc", lambda: fid.precision_recall(generated, real))


@register_metric("precision", direction="max", title="improved precision (k = 3, Inception pool3)", **IMAGE_METRIC)
def precision_metric(samples: Tensor, dataset: ImageDataset, evaluation, device: torch.device) -> float:
    """Improved precision: the share of samples inside the k-NN balls (k = 3) of the training images'
    Inception features (as ADM's evaluation suite measures it)."""
    return prc(samples, dataset, evaluation, device)["precision"]


@register_metric("recall", direction="max", title="improved recall (k = 3, Inception pool3)", **IMAGE_METRIC)
def recall_metric(samples: Tensor, dataset: ImageDataset, evaluation, device: torch.device) -> float:
    """Improved recall: the share of training images inside the k-NN balls (k = 3) of the samples' features."""
    return prc(samples, dataset, evaluation, device)["recall"]


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
    labels = labels.to(samples.device)
    kls = []
    for k in range(dataset.num_classes):
        density = lambda xy, k=k: dataset.class_densities(xy)[:, k]  # noqa: E731
        kls.append(histogram_kl(samples[labels == k], dataset, masses=dataset.bin_masses(KL_BINS, density=density)))
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
