"""MeanFlow (docs/methods.md §5.2), in the canonical convention.

MeanFlow's u(z; t, r) with t = 1 noise is −v(z; 1 − t, 1 − r) canonically (methods/conventions.py). Its
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

from methods.counting import CountingNet
from methods.flow_map import sample_flow_map
from methods.interpolants import expand_time
from methods.terms import Distance, Method, MethodParams, Setting, Term, register_method
from methods.time_samplers import LogitNormal, LogitNormalParams


def meanflow_term(net: CountingNet, x: Tensor, a: Tensor, b: Tensor, velocity: Tensor, distance: Distance) -> Term:
    """v_θ(x; a, b) (one forward with grad) regressed onto sg(velocity + (b − a)·d/da v), the total derivative
    from one JVP with tangent (velocity, 1, 0) computed under no_grad: it only feeds the detached target."""
    pred = net(x, a, b)
    with torch.no_grad():
        _, dv_da = net.jvp((x, a, b), (velocity, torch.ones_like(a), torch.zeros_like(b)))
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

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: torch.Generator) -> list[Term]:
        n, interpolant = x1.shape[0], self.setting.interpolant
        x0 = interpolant.sample_base(n, x1.shape[1:], gen)
        a, b = self.time_sampler.offdiagonal(n, step, gen)
        b = torch.where(torch.rand(n, generator=gen, device=gen.device) < self.params.ratio, b, a)
        x_a = interpolant.interpolate(x0, x1, a)
        return [meanflow_term(net, x_a, a, b, interpolant.velocity(x0, x1), self.distance)]

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: torch.Generator) -> Tensor:
        return sample_flow_map(net, x0, nfe)
