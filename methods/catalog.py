"""The complete registries: importing this module registers every dataset, model, method, sampler and metric."""

from methods import (  # noqa: F401 — importing registers
    consistency,
    flow_matching,
    images,
    meanflow,
    secant,
    self_distillation,
    shortcut,
    unet,
)
from methods.datasets import DATASETS
from methods.metrics import METRICS
from methods.nets import MODELS
from methods.terms import METHODS
from methods.time_samplers import TIME_SAMPLERS

__all__ = ["DATASETS", "METHODS", "METRICS", "MODELS", "TIME_SAMPLERS"]
