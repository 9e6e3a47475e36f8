"""MeanFlow (docs/methods.md §5.2), in the canonical convention.

MeanFlow's u(z; t, r) with t = 1 noise is −v(z; 1 − t, 1 − r) canonically (methods/contracts/conventions.py). Its
identity u = v − (t − r)·du/dt becomes, for the jump a → b along a trajectory x_a,
    v(x_a; a, b) = v_a(x_a) + (b − a)·d/da v(x_a; a, b),   d/da v = ∂_a v + ∇_x v · v_a,
(differentiate X_{a,b}(x_a) = x_b, which does not depend on a). Training replaces the velocity v_a by the
conditional velocity x1 − x0 (so the target is linear in it and right in expectation) and detaches the target.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat
from torch import Tensor, nn

from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.flow_map import sample_flow_map
from orch.methods.contracts.guidance import cond_and_null, in_interval, labels_of
from orch.methods.contracts.interpolants import expand_time
from orch.methods.contracts.method import Distance, Method, MethodParams, Setting, Term, register_method
from orch.methods.contracts.time_samplers import LogitNormal, LogitNormalParams
from orch.methods.runtime.parallel import Gen, rand


def meanflow_term(
    net: CountingNet,
    x: Tensor,
    a: Tensor,
    b: Tensor,
    velocity: Tensor,
    distance: Distance,
    tangent: Tensor | None = None,
) -> Term:
    """v_θ(x; a, b) (one forward with grad) regressed onto sg(velocity + (b − a)·d/da v), the total derivative
    from one JVP with tangent (tangent, 1, 0) computed under no_grad: it only feeds the detached target. The
    tangent is the velocity itself unless given (iMF: the model's own)."""
    pred = net(x, a, b)
    tangent = velocity if tangent is None else tangent
    with torch.no_grad():
        _, dv_da = net.jvp((x, a, b), (tangent, torch.ones_like(a), torch.zeros_like(b)))
        target = velocity + expand_time(b - a, x) * dv_da
    return Term("meanflow", pred, target, a, b, distance=distance)


class MeanFlowParams(MethodParams):
    ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25
    """Fraction of samples with a real jump (r ≠ t); the rest have a = b (flow matching). ImageNet default 0.25,
    MeanFlow's CIFAR-10 setting 0.75."""
    adaptive_p: NonNegativeFloat = 1.0
    """Adaptive weight ℓ/sg((ℓ + c)^p); p = 0 is plain squared error. ImageNet p = 1, c = 0.01; CIFAR-10
    p = 0.75, c = 1e-3."""
    adaptive_c: PositiveFloat = 0.01
    """c of the adaptive weight (on the summed squared error, as the reference)."""
    cfg_omega: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0
    """ω of CFG in training (class-conditional data): the target's velocity becomes
    v_g = ω·v + (1 − ω − κ)·u(x; τ, τ, ∅) + κ·u(x; τ, τ, y), with the model's own diagonal (no grad). ω = 1,
    κ = 0 is plain conditional training."""
    cfg_kappa: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """κ of CFG in training (MeanFlow's ImageNet config: 0.5, with ω = 1)."""
    cfg_interval: Annotated[list[Annotated[float, Field(ge=0.0, le=1.0)]], Field(min_length=2, max_length=2)] | None = (
        None
    )
    """[τ_lo, τ_hi]: guide the target only where the jump's start τ lies inside (orch's time, 0 = noise);
    elsewhere v_g = v. null: everywhere."""


@register_method("meanflow")
class MeanFlow(Method):
    """MeanFlow: average velocity regressed onto a JVP target with the adaptive weight.

    Jumps (a, b) = two sorted draws of the time sampler (default: logit-normal(−0.4, 1.0)), b = a on a fraction
    1 − ratio; the one-step sampler is the jump 0 → 1 (MeanFlow's t = 1 → r = 0), NFE = N steps.

    Z. Geng, M. Deng, X. Bai, J. Z. Kolter, K. He, "Mean Flows for One-step Generative Modeling", 2025,
    arXiv:2505.13447.
    """

    Params = MeanFlowParams

    def __init__(self, params: MeanFlowParams, setting: Setting):
        super().__init__(params, setting)
        self.distance = Distance("adaptive", params.adaptive_c, params.adaptive_p)
        self.time_sampler = setting.time_sampler or LogitNormal(LogitNormalParams())

    def guides_in_training(self) -> bool:
        """Whether the target's velocity is guided (cfg_omega/cfg_kappa on class-conditional data)."""
        p = self.params
        return self.setting.num_classes is not None and (p.cfg_omega != 1.0 or p.cfg_kappa != 0.0)

    def diagonal_count(self, batch: int) -> int:
        """round((1 − ratio)·batch): the diagonal rows at the start of a batch, for the descendants that split
        their batch by position as their references do (MeanFlow itself draws b = a per sample)."""
        return round(batch * (1 - self.params.ratio))

    def expected_passes(self, batch: int) -> tuple[float, float]:
        """The student's forward and the target's JVP, and with CFG in training the batched cond/null diagonal."""
        return 1.0 + 2 * self.guides_in_training(), 1.0

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        x_a, a, b, velocity = self.jumps(x1, step, gen)
        velocity = self.guided_velocity(net, x_a, a, velocity)
        return [meanflow_term(net, x_a, a, b, velocity, self.distance)]

    def jumps(self, x1: Tensor, step: int, gen: Gen) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(I_a, a, b, x1 − x0) for the batch x1: (a, b) two sorted draws of the time sampler, b = a on a fraction
        1 − ratio of samples (each drawn independently)."""
        n, interpolant = x1.shape[0], self.setting.interpolant
        x0 = interpolant.sample_base(n, x1.shape[1:], gen)
        a, b = self.time_sampler.offdiagonal(n, step, gen)
        b = torch.where(rand(gen, n) < self.params.ratio, b, a)
        return interpolant.interpolate(x0, x1, a), a, b, interpolant.velocity(x0, x1)

    def guided_velocity(self, net: CountingNet, x_a: Tensor, a: Tensor, v: Tensor) -> Tensor:
        """MeanFlow's CFG in training: v_g = ω·v + (1 − ω − κ)·u(x_a; a, a, ∅) + κ·u(x_a; a, a, y) from one
        batched no-grad pass of the model's own diagonal; v_g = v for dropped labels (the null class) and
        outside the guidance interval, and v itself when unconditional or at ω = 1, κ = 0. Shapes of x_a."""
        p, labels = self.params, labels_of(net)
        if labels is None or (p.cfg_omega == 1.0 and p.cfg_kappa == 0.0):
            return v
        num_classes = self.setting.num_classes
        with torch.no_grad():
            u_cond, u_null = cond_and_null(net, net.condition, num_classes, x_a, a, a)
        v_g = p.cfg_omega * v + (1 - p.cfg_omega - p.cfg_kappa) * u_null + p.cfg_kappa * u_cond
        guided = in_interval(a, p.cfg_interval) & (labels != num_classes)
        return torch.where(expand_time(guided, v), v_g, v)

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: Gen) -> Tensor:
        return sample_flow_map(net, x0, nfe)
