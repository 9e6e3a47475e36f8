"""The complete registries: importing this module registers every dataset, model, method, sampler and metric."""

from methods import flow_matching, self_distillation  # noqa: F401 — modules register their methods on import
from methods.datasets import DATASETS
from methods.metrics import METRICS
from methods.nets import MODELS
from methods.terms import METHODS
from methods.time_samplers import TIME_SAMPLERS

__all__ = ["DATASETS", "METHODS", "METRICS", "MODELS", "TIME_SAMPLERS"]
