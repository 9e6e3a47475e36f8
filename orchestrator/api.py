"""The plugin API: every name a method, network, dataset, metric, time sampler or backend plugin may import, from
this one module (`from orch.api import Method, register_method, …`). These names are stable: a change to one of
them is a breaking change of orch, announced as one. docs/contracts.md lists them with what each is for.

Everything else in orch is internal and may move. Nothing in orch imports this module.
"""

from orch.backends.base import BACKENDS, JOB_FILE, Backend, BackendError, BackendParams, register_backend
from orch.execution.runner import run_trial
from orch.execution.trial import Trial
from orch.methods.contracts.flow_map import jump, sample_euler, sample_flow_map
from orch.methods.contracts.guidance import ClassConditioning
from orch.methods.contracts.interpolants import LinearInterpolant, expand_time
from orch.methods.contracts.method import (
    METHODS,
    Distance,
    Method,
    MethodParams,
    Setting,
    TeacherSpec,
    Term,
    register_method,
)
from orch.methods.contracts.metric_keys import EvalKey, eval_key, parse_eval_key
from orch.methods.contracts.registry import Params, Registry
from orch.methods.contracts.time_samplers import TIME_SAMPLERS, TimeSampler, TimeSamplerParams, Uniform
from orch.methods.data.base import DATASETS, Density2D, LabelledParams
from orch.methods.data.images import ImageDataset
from orch.methods.evaluation.metric import METRICS, MetricSpec, register_metric
from orch.methods.losses.flow_matching import diagonal_term
from orch.methods.networks.base import MODELS
from orch.methods.runtime.parallel import Gen, multinomial, positions, rand, randint, randn, split_count
from orch.trial.state import read_json, write_json
from orch.trial.status import OUTCOMES

__all__ = [
    # options and registries
    "Params",
    "Registry",
    "DATASETS",
    "METHODS",
    "METRICS",
    "MODELS",
    "TIME_SAMPLERS",
    "BACKENDS",
    # methods
    "Method",
    "MethodParams",
    "Setting",
    "TeacherSpec",
    "Term",
    "Distance",
    "register_method",
    "diagonal_term",
    # the canonical convention: interpolant, flow map, samplers, time samplers
    "LinearInterpolant",
    "expand_time",
    "jump",
    "sample_flow_map",
    "sample_euler",
    "TimeSampler",
    "TimeSamplerParams",
    "Uniform",
    # random draws that data-parallel trials share
    "Gen",
    "rand",
    "randn",
    "randint",
    "multinomial",
    "positions",
    "split_count",
    # data and networks
    "Density2D",
    "ImageDataset",
    "LabelledParams",
    "ClassConditioning",
    # metrics
    "MetricSpec",
    "register_metric",
    # backends
    "Backend",
    "BackendParams",
    "BackendError",
    "register_backend",
    "JOB_FILE",
    "OUTCOMES",
    "Trial",
    "run_trial",
    "read_json",
    "write_json",
    # metric keys
    "eval_key",
    "parse_eval_key",
    "EvalKey",
]
