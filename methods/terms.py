"""The method contract: a method turns a batch into named regression terms; the trainer does the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, Protocol

import torch
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor, nn

from methods.interpolants import LinearInterpolant
from methods.registry import Batch, Params, Registry, Steps


@dataclass(frozen=True)
class Distance:
    """How a per-sample squared error ℓ becomes a loss (the trainer applies it, docs/methods.md §2.3).

    `l2`: ℓ. `pseudo_huber`: √(ℓ + c²) − c (iCT). `adaptive`: ℓ / sg((ℓ + c)^p) (MeanFlow).
    """

    kind: Literal["l2", "pseudo_huber", "adaptive"] = "l2"
    c: float = 0.0
    p: float = 1.0

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
    """

    name: str
    pred: Tensor
    target: Tensor
    a: Tensor
    b: Tensor
    weight: Tensor | None = None
    distance: Distance = L2
    measured: Tensor | None = None

    def sq_error(self) -> Tensor:
        """Per-sample squared error summed over all data dimensions (not averaged), shape (n,)."""
        return (self.pred - self.target).pow(2).flatten(1).sum(1)

    def target_norms(self) -> Tensor:
        """Per-sample L2 norm of the (detached) target: paper B's loss-target variance is their batch std."""
        measured = self.target if self.measured is None else self.measured
        return measured.detach().flatten(1).norm(dim=1)


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
    """A trained teacher: a teacher file written by orch (`teacher.pt`) or a trial directory of any study (its
    newest checkpoint's first EMA copy). null: orch trains a flow-matching teacher for this dataset and model
    with the budget below, once, caches it under <workdir>/teachers/<hash> and reuses it everywhere."""
    steps: Steps = 3000
    batch_size: Batch = 512
    lr: PositiveFloat = 5e-3
    lr_decay_steps: PositiveInt | None = 2000
    ema: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.99
    seed: NonNegativeInt = 0


@dataclass
class Setting:
    """What every method is built with besides its own options.

    Attributes:
        interpolant: the canonical linear interpolant with the data-std Gaussian base.
        time_sampler: the study's time sampler; None (`auto`) = the method's own default.
        sigma_data: the scalar data std σ_d used by TrigFlow/EDM conventions (the mean of the base std).
        teacher: a frozen flow-matching network whose diagonal v(x; τ, τ) is the teacher velocity, for methods
            that distil (the trainer wraps it in the evaluation counter).
    """

    interpolant: LinearInterpolant
    time_sampler: object | None
    sigma_data: float
    teacher: nn.Module | None = None


class Method(Protocol):
    def terms(self, net: nn.Module, x1: Tensor, step: int, gen: torch.Generator) -> list[Term]: ...

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: torch.Generator) -> Tensor: ...


METHODS = Registry("method")
