"""Terminal Velocity Matching (TVM) (docs/methods.md, "TVM").

The exact flow map satisfies ∂_b X_{a,b}(x) = v(X_{a,b}(x); b, b): the velocity at the end of a jump is the
instantaneous velocity where it lands. TVM regresses the terminal velocity ∂_b X of the model's jump (a JVP in b,
with the gradient through it) onto the velocity of an EMA(0.99) copy at the detached landing point — paper A's
LSD residual with an EMA teacher — and adds flow matching at an independent time on every sample. Times come
from a gap sampler: the jump length first, then its end.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field, PositiveFloat
from torch import Tensor, nn

from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.flow_map import sample_flow_map
from orch.methods.contracts.guidance import labels_of
from orch.methods.contracts.interpolants import expand_time
from orch.methods.contracts.method import DimReduction, Method, MethodParams, Setting, Term, register_method
from orch.methods.losses.self_distillation import lsd_term, own_diagonal
from orch.methods.runtime.parallel import Gen, rand, randn


def gap_times(n: int, gen: Gen, gap: tuple[float, float], end: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """TVM's jumps (a, b): the length ℓ = σ(μ_ℓ + s_ℓ·n) first, then the end b from the logit-normal
    σ(μ + s·n) truncated to b ≥ ℓ (by its inverse CDF), a = b − ℓ. Shapes (n,)."""
    length = torch.sigmoid(gap[0] + gap[1] * randn(gen, n))
    lowest = torch.special.ndtr((torch.logit(length) - end[0]) / end[1])
    q = (lowest + rand(gen, n) * (1 - lowest)).clamp(max=1 - 1e-7)
    b = torch.sigmoid(end[0] + end[1] * torch.special.ndtri(q))
    return (b - length).clamp(min=0.0), b


class TVMParams(MethodParams):
    reference_reduction: ClassVar[DimReduction] = "mean"  # the reference averages over dimensions
    guidance: Annotated[float, Field(ge=1.0, le=100.0)] = 1.0
    """w: the CFG scale trained in (class-conditional data; fixed per run, as every released config). The
    flow-matching target is w·(x1 − x0) + (1 − w)·v_EMA(I_τ; τ, τ, ∅), both terms are weighted 1/w², and the model
    samples guided with one evaluation per step (evaluate it at eval.guidance 1). Rows whose label was dropped
    train at w = 1."""
    teacher_ema: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.99
    """Decay of the EMA copy whose velocity is the target (the paper: 0.99; 0 would be the live weights)."""
    gap_mean: float = -0.8
    """Mean of the normal whose sigmoid is the jump length ℓ."""
    gap_std: PositiveFloat = 1.0
    """Its std."""
    time_mean: float = 0.4
    """Mean of the normal whose sigmoid is the jump's end b (truncated to b ≥ ℓ) and the flow-matching time τ
    (orch's time: the paper's logit-normal(−0.4, 1) of its noise level)."""
    time_std: PositiveFloat = 1.0
    """Its std."""


@register_method("tvm")
class TVM(Method):
    """Terminal velocity matching: LSD's Lagrangian residual against an EMA(0.99) teacher, plus flow matching at
    an independent time on every sample; its own gap time sampler; the uniform N-step flow-map sampler.

    The guidance scale is a fixed training option (no guidance input) and the output is not rescaled by w:
    with w fixed, the paper's scaled parameterisation changes the network's output scale only.

    L. Zhou, M. Parger, A. Haque, J. Song, "Terminal Velocity Matching", 2025, arXiv:2511.19797.
    """

    Params, own_times = TVMParams, True

    def __init__(self, params: TVMParams, setting: Setting):
        super().__init__(params, setting)
        self.teacher = setting.ema_copy(params.teacher_ema) if setting.ema_copy is not None else None

    @classmethod
    def backpropagates_jvp(cls, params: TVMParams) -> bool:
        return True  # ∂_b X is the prediction

    def guided(self) -> bool:
        return self.setting.num_classes is not None and self.params.guidance != 1.0

    def expected_passes(self, batch: int) -> tuple[float, float]:
        """The JVP in b (with grad), the teacher at the landing point, the flow-matching forward, and when
        guided the teacher's unconditional velocity there."""
        return 2.0 + self.guided(), 1.0

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        p, n, interpolant = self.params, x1.shape[0], self.setting.interpolant
        x0 = interpolant.sample_base(n, x1.shape[1:], gen)
        a, b = gap_times(n, gen, (p.gap_mean, p.gap_std), (p.time_mean, p.time_std))
        tau = torch.sigmoid(p.time_mean + p.time_std * randn(gen, n))
        terminal = lsd_term(net, interpolant.interpolate(x0, x1, a), a, b, "convex", own_diagonal(self.teacher))
        terminal.name = "tvm"
        x_tau = interpolant.interpolate(x0, x1, tau)
        target, w = self.flow_matching_target(x_tau, tau, interpolant.velocity(x0, x1))
        fm = Term("diag", net(x_tau, tau, tau), target, tau, tau)
        terminal.weight = fm.weight = w.pow(-2)
        return [terminal, fm]

    def flow_matching_target(self, x: Tensor, tau: Tensor, velocity: Tensor) -> tuple[Tensor, Tensor]:
        """(w·İ + (1 − w)·v_EMA(x; τ, τ, ∅), w) per row, w = 1 where unguided (unconditional, w = 1, or a dropped
        label). Shapes: x, velocity (n, ...); tau (n,)."""
        w = torch.ones_like(tau)
        labels = labels_of(self.teacher)
        if not self.guided() or labels is None:
            return velocity, w
        w = torch.where(labels == self.setting.num_classes, w, torch.full_like(w, self.params.guidance))
        condition = self.teacher.condition
        with (
            torch.no_grad(),
            condition.using(torch.full_like(labels, self.setting.num_classes), condition.omega, condition.interval),
        ):
            unconditional = self.teacher(x, tau, tau)
        return expand_time(w, x) * velocity + expand_time(1 - w, x) * unconditional, w

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: Gen) -> Tensor:
        return sample_flow_map(net, x0, nfe)
