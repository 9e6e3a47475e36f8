"""Inception metrics of images (docs/methods.md §3.8): FID, KID, Inception Score, precision and recall."""

from __future__ import annotations

import torch
from torch import Tensor

from orch.methods.data.images import ImageDataset
from orch.methods.evaluation import fid
from orch.methods.evaluation.metric import register_metric

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
    return fid.fid_between(*generated_and_real(samples, dataset, evaluation, device))


@register_metric("kid", direction="min", title="KID (unbiased MMD², cubic polynomial kernel)", **IMAGE_METRIC)
def kid_metric(samples: Tensor, dataset: ImageDataset, evaluation, device: torch.device) -> float:
    """KID of uint8 samples against the training images: torch-fidelity's unbiased MMD² over subsets of ≤ 1000."""
    return fid.kid(*generated_and_real(samples, dataset, evaluation, device))[0]


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
