"""The method contract: a method turns a batch into named regression terms; the trainer does the rest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor, nn

from orch.methods.contracts.interpolants import LinearInterpolant
from orch.methods.contracts.registry import Batch, Params, Registry, Steps
from orch.methods.runtime.parallel import Gen
from orch.methods.runtime.precision import at_least_fp32


@dataclass(frozen=True)
class Distance:
    """How a per-sample squared error ℓ becomes a loss (the trainer applies it, docs/methods.md §2.3).

    `l2`: ℓ. `pseudo_huber`: √(ℓ + c²) − c (iCT). `adaptive`: ℓ / sg((ℓ + c)^p) (MeanFlow). `cosine` > 0 adds
    that multiple of the direction error (TiM) to ℓ before the kind applies (Term.error).
    """

    kind: Literal["l2", "pseudo_huber", "adaptive"] = "l2"
    c: float = 0.0
    p: float = 1.0
    cosine: float = 0.0

    def __call__(self, sq_error: Tensor) -> Tensor:
        if self.kind == "pseudo_huber":
            return (sq_error + self.c**2).sqrt() - self.c
        if self.kind == "adaptive":
            return sq_error / (sq_error.detach() + self.c) ** self.p
        return sq_error


L2 = Distance()


@dataclass
class Term:
    """One regression of a network output onto a target.

    Attributes:
        name: the term's name in metric keys (`train/loss/<name>`, `train/target_std/<name>`).
        pred: prediction with its graph, shape (n, *data_shape).
        target: regression target, shape (n, *data_shape); detached or not according to the stop-gradient
            setting (a target that keeps its graph is part of the gradient path).
        a, b: per-sample jump times (n,), used by learned weighting and per-time statistics.
        weight: fixed per-sample factor that is part of the method's loss (iCT's 1/Δσ, sCT's 1/σ prior).
        distance: how the squared error becomes a loss.
        measured: what paper B measures as this method's loss target when it is not `target` itself (e.g. the
            JVP output d/dt f of a continuous consistency model, docs/methods.md §4.5); None = `target`.
        custom: a per-sample loss (n,) the method computed itself because it is not a regression (IMM's kernel
            MMD over groups of samples): the trainer takes it as given instead of the distance of the squared
            error, logs it as the term's loss, and `pred`/`target` only feed the target statistics.
    """

    name: str
    pred: Tensor
    target: Tensor
    a: Tensor
    b: Tensor
    weight: Tensor | None = None
    distance: Distance = L2
    measured: Tensor | None = None
    custom: Tensor | None = None

    def sq_error(self) -> Tensor:
        """Per-sample squared error summed over all data dimensions (not averaged), shape (n,); in at least fp32
        whatever the precision of the passes (methods/runtime/precision.py)."""
        pred, target = self.pred.to(at_least_fp32(self.pred)), self.target.to(at_least_fp32(self.target))
        return (pred - target).pow(2).flatten(1).sum(1)

    def error(self, dim_scale: float) -> Tensor:
        """The per-sample error the distance applies to, shape (n,): the squared error reduced over dimensions
        by `dim_scale` (train.dim_reduction), plus the distance's multiple of the direction error; the custom
        loss as given."""
        if self.custom is not None:
            return self.custom.to(at_least_fp32(self.custom))
        error = self.sq_error() * dim_scale
        if self.distance.cosine:
            error = error + self.distance.cosine * direction_error(self.pred, self.target)
        return error

    def weighted(self, error: Tensor) -> Tensor:
        """The term's per-sample loss from its error: the distance (not for a custom loss), times `weight`."""
        loss = error if self.custom is not None else self.distance(error)
        return loss if self.weight is None else loss * self.weight

    def target_norms(self) -> Tensor:
        """Per-sample L2 norm of the (detached) target: paper B's loss-target variance is their batch std."""
        measured = self.target if self.measured is None else self.measured
        return measured.detach().to(at_least_fp32(measured)).flatten(1).norm(dim=1)


def direction_error(pred: Tensor, target: Tensor) -> Tensor:
    """1 − cos(pred, target) over the channel dimension 1, averaged over the other dimensions (pixels), shape
    (n,): TiM's directional loss. Shapes: pred, target (n, C, ...)."""
    pred, target = pred.to(at_least_fp32(pred)), target.to(at_least_fp32(target))
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=1, eps=1e-8)
    return (1 - cos).reshape(len(cos), -1).mean(1)


DimReduction = Literal["sum", "mean", "mean_div_d"]
"""How a sample's squared error is reduced over its D data dimensions: Σ_d, Σ_d/D, or Σ_d/D² (sCM's reference
averages over dimensions and divides by D again)."""


class MethodParams(Params):
    """Options of a method. `reference_reduction` is the per-dimension reduction of the method's reference
    implementation: `train.dim_reduction: auto` resolves to it (docs/methods.md lists each reference)."""

    reference_reduction: ClassVar[DimReduction] = "sum"


class TeacherSpec(Params):
    """The frozen flow-matching teacher of a distillation method (v_T(x, τ) = teacher(x; τ, τ))."""

    path: str | None = None
    """A trained teacher: a teacher file written by orch (`teacher.pt`), a trial directory of any study (its
    newest checkpoint's first EMA copy), or for model dit a checkpoint of the DiT/SiT repositories (e.g.
    SiT-XL-2-256.pt, loaded into the trial's network as model.init_from is). null: orch plans a flow-matching
    teacher trial for this dataset and model with the budget below, trains it first (`orch plan` lists it) once
    per work directory, under <workdir>/teachers/trials/<id>, and every study there reuses it."""
    steps: Steps = 3000
    """Training steps of the teacher orch trains."""
    batch_size: Batch = 512
    """Its batch size."""
    lr: PositiveFloat = 5e-3
    """Its learning rate."""
    lr_decay_steps: PositiveInt | None = 2000
    """Its learning-rate decay (as train.lr_decay_steps)."""
    ema: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.99
    """The EMA decay whose weights become the teacher."""
    seed: NonNegativeInt = 0
    """Its seed."""


class StageSpec(Params):
    """A prior stage a trial starts from: a trial of another method, trained first (TCM's stage 1, CMT's
    mid-training before ECT). The student loads its weights, and a method that needs it keeps it frozen
    (Setting.stage)."""

    path: str | None = None
    """A trained stage: an orch teacher file or a trial directory of the stage's method. null: orch plans the stage
    trial — the trial's dataset, network, teacher and train section, with the stage's method and `steps` — and
    trains it first, once per work directory, under <workdir>/teachers/trials/<id> (`orch plan` lists the
    chain)."""
    steps: Steps = 2000
    """Training steps of the stage orch trains."""


@dataclass
class Setting:
    """What every method is built with besides its own options.

    Attributes:
        interpolant: the canonical linear interpolant with the data-std Gaussian base.
        time_sampler: the study's time sampler; None (`auto`) = the method's own default.
        sigma_data: the scalar data std σ_d used by TrigFlow/EDM conventions (the mean of the base std).
        teacher: a frozen flow-matching network whose diagonal v(x; τ, τ) is the teacher velocity, for a method
            that needs one; the trainer hands it over wrapped in the evaluation counter.
        ema_target: the first EMA copy of the student, for a method whose targets come from it
            (Method.needs_ema_target), also wrapped in the counter.
        num_classes: the number of classes of class-conditional data (None: unconditional); the networks'
            labels then travel in their wrappers' shared Condition (methods/contracts/guidance.py).
        steps: train.steps, for a method whose options are schedules over training (α-Flow's curriculum).
        ema_copy: the counted EMA copy of the student at a decay the method chooses (TVM's 0.99 teacher),
            made by the trainer on first request when train.ema does not have it.
        guide: the frozen weak teacher of autoguidance (method.autoguide), counted like the teacher.
        stage: the frozen network of the prior stage the trial started from (Method.stage_key), counted like
            the teacher, for a method whose loss uses it (TCM's stage-1 model below its transition time).
    """

    interpolant: LinearInterpolant
    time_sampler: object | None
    sigma_data: float
    teacher: nn.Module | None = None
    ema_target: nn.Module | None = None
    num_classes: int | None = None
    steps: int | None = None
    ema_copy: Callable[[float], nn.Module] | None = None
    guide: nn.Module | None = None
    stage: nn.Module | None = None


class Method:
    """A training method: it turns a batch into regression terms and generates with its own sampler; the
    trainer does everything else (loss, weighting, optimiser, EMA, counting).

    Capabilities each method class declares:
        Params: its options (a MethodParams subclass), validated from the study file.
        own_times: it draws its times on its own discrete schedule, so the study's time sampler must be `auto`.
        needs_ema_target: its targets come from the EMA weights (Setting.ema_target).
        needs_teacher(params): it distils a frozen teacher (Setting.teacher), for these options.
        backpropagates_jvp(params): its loss back-propagates through a JVP's tangent, for these options.
        stage_key, stage_method(params): the option (a StageSpec) naming the prior stage the trial starts from,
            and that stage's method section.
    """

    Params: ClassVar[type[MethodParams]] = MethodParams
    own_times: ClassVar[bool] = False
    needs_ema_target: ClassVar[bool] = False
    stage_key: ClassVar[str | None] = None

    @classmethod
    def stage_method(cls, params: MethodParams) -> dict:
        """The method section (registry names and options: data) of the prior stage's trial, for these options;
        asked only when the option `stage_key` is set."""
        raise NotImplementedError

    def __init__(self, params: MethodParams, setting: Setting):
        self.params, self.setting = params, setting

    @classmethod
    def needs_teacher(cls, params: MethodParams) -> bool:
        return False

    @classmethod
    def train_problems(cls, params: MethodParams, train: dict) -> list[tuple[str, str]]:
        """(key, message) for each way these options cannot train with this (valid) train section, e.g. a group
        size that does not divide the batch; checked at validation, before anything runs."""
        return []

    @classmethod
    def backpropagates_jvp(cls, params: MethodParams) -> bool:
        """Whether its loss back-propagates through a JVP's tangent (a JVP back-end must pass that gradient)."""
        return False

    @property
    def embedded_guidance(self) -> tuple[float, float] | None:
        """[ω_lo, ω_hi] when the student takes the guidance scale as an input (the option `online_cfg` of paper B's
        methods and iMF): the trainer then drops no labels and sampling takes one evaluation per step; None:
        two-pass CFG."""
        cfg_range = getattr(self.params, "online_cfg", None)
        return None if cfg_range is None else (cfg_range[0], cfg_range[1])

    @property
    def embedded_interval(self) -> bool:
        """Whether the student also takes the guidance interval [τ_lo, τ_hi] as an input (iMF's `online_interval`):
        sampling then gives it eval.guidance_interval ([0, 1] when null)."""
        return getattr(self.params, "online_interval", False)

    def expected_passes(self, batch: int) -> tuple[float, float] | None:
        """(forward, JVP) network evaluations per training sample in a batch of `batch`, by the method's own
        accounting (docs/methods.md), with these options and this setting: teacher, EMA-target and guidance
        passes included (a batched conditional + null pass counts 2). The trainer's counter must measure exactly
        this (tests/test_stopgrad_and_cost.py, tests/test_guidance.py); None: not declared."""
        return None

    def terms(self, net: nn.Module, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        """The batch's regression terms. Shapes: x1 (n, *data_shape) data; net is the counted student."""
        raise NotImplementedError

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: Gen) -> Tensor:
        """Samples (n, *data_shape) from base noise x0 with `nfe` network evaluations; `gen` draws any fresh
        noise a sampler needs."""
        raise NotImplementedError


def register_method(name: str):
    """Register a Method class under `name`, with its Params as the options (the class is the builder)."""

    def decorator(cls: type[Method]) -> type[Method]:
        return METHODS.register(name, cls.Params)(cls)

    return decorator


METHODS = Registry("method")
