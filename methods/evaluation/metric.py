"""The metric contract: a registered MetricSpec says how a metric is computed (from (samples, dataset,
eval config, device) to one number), whether lower or higher is better, what its value depends on besides
the samples (its fingerprint: the eval options it reads, the feature extractor) and how it reads in words."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from orch.methods.contracts.metric_keys import METRIC_NAME
from orch.methods.contracts.registry import Params, Registry
from orch.methods.evaluation import fid

METRICS = Registry("metric")


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
        options_model: the metric's own options (a Params model), set in a study as
            `eval.metric_options.<name>`; compute gets them validated, as the keyword `options`, and they are part
            of its fingerprint. None: it has none.
    """

    name: str
    compute: Callable[..., float]
    direction: Literal["min", "max"]
    title: str
    options: tuple[str, ...] = ()
    extractor: str | None = None
    labelled: bool = False
    options_model: type[Params] | None = None

    def __call__(
        self, samples: Tensor, dataset, evaluation, device: torch.device, labels: Tensor | None = None
    ) -> float:
        args = (samples, dataset, evaluation, device) + ((labels,) if self.labelled else ())
        if self.options_model is not None:
            return self.compute(*args, options=self.options_of(evaluation.metric_options))
        return self.compute(*args)

    def options_of(self, metric_options: dict[str, dict]) -> Params:
        """This metric's options from an eval section's `metric_options`, validated (defaults filled)."""
        return self.options_model.model_validate(metric_options.get(self.name, {}))

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
    options_model: type[Params] | None = None,
):
    """Register a metric function (samples, dataset, evaluation, device[, labels][, options]) -> float with its
    spec; `requires` are the dataset capabilities it needs (e.g. "density", "images", "classes")."""

    if not METRIC_NAME.fullmatch(name):  # its keys (eval/<name>/…) must parse back
        raise ValueError(f"metric name {name!r}: use lower-case letters, digits and _ only")

    def decorator(compute: Callable[..., float]) -> Callable[..., float]:
        spec = MetricSpec(name, compute, direction, title, options, extractor, labelled, options_model)
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
