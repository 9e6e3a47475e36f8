"""Align Your Flow (AYF): flow-map distillation with normalised, detached tangents (docs/methods.md §10.2).

Both losses regress v_θ(I_a; a, b) onto sg(v_θ + ĝ), so the gradient is −2·ĝᵀ∂v_θ/∂θ: the student moves along a
normalised residual ĝ = g/(‖g‖ + c)^p that no gradient flows through (sCM's stabilisation, generalised to flow
maps). AYF-EMD's g is the Eulerian residual d/da X_{a,b}(x_a) along the teacher's flow,
    g = b̂(I_a, a) − v_θ(I_a; a, b) + r·(b − a)·d/da v_θ,   d/da v = ∂_a v + ∇_x v·b̂   (one no-grad JVP),
zero at the exact map when r = 1 (r warms up to r_max); AYF-LMD's is the Lagrangian residual
    h = ∂_b X_{a,b}(I_a) − b̂(sg X_{a,b}(I_a), b)   and the target is sg(v_θ − ĥ).
At b = a both reduce to flow matching onto the teacher.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat
from torch import Tensor, nn

from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.flow_map import sample_flow_map
from orch.methods.contracts.interpolants import expand_time
from orch.methods.contracts.method import Method, Setting, Term, register_method
from orch.methods.contracts.teacher import DistillationParams, DistilsTeacher, Velocity
from orch.methods.contracts.time_samplers import LogitNormal, LogitNormalParams
from orch.methods.runtime.parallel import Gen


class TangentNorm:
    """ĝ = g/(‖g‖ + c)^p per sample, ‖g‖ over all of a sample's dimensions (or ‖g‖/√D with spatial_invariance)."""

    def __init__(self, c: float, p: float, spatial_invariance: bool):
        self.c, self.p, self.spatial_invariance = c, p, spatial_invariance

    def __call__(self, g: Tensor) -> Tensor:
        """Shape of g (n, ...)."""
        norm = g.flatten(1).norm(dim=1)
        if self.spatial_invariance:
            norm = norm / math.sqrt(g[0].numel())
        return g / expand_time((norm + self.c) ** self.p, g)


def ayf_emd_term(
    net: CountingNet, x: Tensor, a: Tensor, b: Tensor, velocity: Velocity, r: float, norm: TangentNorm
) -> Term:
    """v_θ(x; a, b) regressed onto sg(v_θ + ĝ), g = b̂(x, a) − v_θ + r·(b − a)·d/da v_θ with the total derivative
    along the teacher's flow from one no-grad JVP with tangent (b̂, 1, 0). Shapes: x (n, ...); a, b (n,)."""
    pred = net(x, a, b)
    with torch.no_grad():
        b_hat = velocity(x, a)
        _, dv_da = net.jvp((x, a, b), (b_hat, torch.ones_like(a), torch.zeros_like(b)))
        g = b_hat - pred + r * expand_time(b - a, x) * dv_da
        target = pred + norm(g)
    return Term("ayf_emd", pred, target, a, b)


def ayf_lmd_term(net: CountingNet, x: Tensor, a: Tensor, b: Tensor, velocity: Velocity, norm: TangentNorm) -> Term:
    """v_θ(x; a, b) regressed onto sg(v_θ − ĥ), h = ∂_b X_{a,b}(x) − b̂(sg X_{a,b}(x), b) with ∂_b X = v + (b − a)·∂_b v
    from one no-grad JVP with tangent (0, 0, 1). Shapes: x (n, ...); a, b (n,)."""
    pred = net(x, a, b)
    with torch.no_grad():
        v, dv_db = net.jvp((x, a, b), (torch.zeros_like(x), torch.zeros_like(a), torch.ones_like(b)))
        gap = expand_time(b - a, x)
        h = v + gap * dv_db - velocity(x + gap * v, b)
        target = pred - norm(h)
    return Term("ayf_lmd", pred, target, a, b)


class AYFParams(DistillationParams):
    tangent_norm: PositiveFloat = 0.1
    """c of the normalisation ĝ = g/(‖g‖ + c)^p."""
    norm_power: NonNegativeFloat = 1.0
    """p of the normalisation (1: AYF's and sCM's; 0: no normalisation)."""
    spatial_invariance: bool = False
    """Normalise by ‖g‖/√D instead of ‖g‖ (D a sample's dimensions), so c means the same at every resolution."""
    space: Literal["velocity", "map"] = "velocity"
    """velocity: the regression is on v_θ (weight 1); map: on X_θ = x + (b − a)·v_θ, which multiplies the
    gradient by b − a (a re-implementation's choice; AYF's own weighting is not verified)."""


class AYFEMDParams(AYFParams):
    r_max: Annotated[float, Field(ge=0.0, le=1.0)] = 0.99
    """The final weight r of the tangent's derivative term (AYF: 0.99, leaving a small flow-matching regulariser;
    1: exactly zero at the exact map)."""
    warmup: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    """The fraction of train.steps over which r rises linearly from 0 to r_max (AYF's schedule is not verified;
    sCM's warms up over 10k of its steps). 0: r_max from the first step."""


AYF = """A. Sabour, S. Fidler, K. Kreis, "Align Your Flow: Scaling Continuous-Time Flow Map Distillation", NeurIPS
    2025, arXiv:2506.14603."""


class AlignYourFlow(DistilsTeacher, Method):
    """AYF: jumps (a, b) from two sorted draws of the time sampler (default logit-normal(−0.8, 1.0) in MeanFlow's
    time, as the reference re-implementation), the teacher's (guided) velocity b̂, the normalised tangent's
    regression, and the uniform N-step flow-map sampler (NFE = N)."""

    Params = AYFParams
    term: ClassVar[str]

    def __init__(self, params: AYFParams, setting: Setting):
        super().__init__(params, setting)
        self.time_sampler = setting.time_sampler or LogitNormal(LogitNormalParams(mean=-0.8, std=1.0))
        self.norm = TangentNorm(params.tangent_norm, params.norm_power, params.spatial_invariance)

    def expected_passes(self, batch: int) -> tuple[float, float]:
        """The student's forward with grad, b̂, and the no-grad JVP."""
        return 1.0 + self.teacher_passes(), 1.0

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        interpolant = self.setting.interpolant
        x0 = interpolant.sample_base(x1.shape[0], x1.shape[1:], gen)
        a, b = self.time_sampler.offdiagonal(x1.shape[0], step, gen)
        term = self.residual(net, interpolant.interpolate(x0, x1, a), a, b, step)
        if self.params.space == "map":
            term.weight = b - a
        return [term]

    def residual(self, net: CountingNet, x_a: Tensor, a: Tensor, b: Tensor, step: int) -> Term:
        raise NotImplementedError

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: Gen) -> Tensor:
        return sample_flow_map(net, x0, nfe)


@register_method("ayf_emd")
class AYFEMD(AlignYourFlow):
    __doc__ = f"""AYF's Eulerian map distillation: the normalised Eulerian residual along the teacher's flow, with
    the derivative term warmed up to r_max.

    {AYF}
    """

    Params = AYFEMDParams

    def r(self, step: int) -> float:
        """r_k = min(k/K_w, 1)·r_max, K_w = warmup·train.steps."""
        p, steps = self.params, self.setting.steps or 1
        ramp = min(1.0, step / (p.warmup * steps)) if p.warmup else 1.0
        return ramp * p.r_max

    def residual(self, net: CountingNet, x_a: Tensor, a: Tensor, b: Tensor, step: int) -> Term:
        return ayf_emd_term(net, x_a, a, b, self.teacher(), self.r(step), self.norm)


@register_method("ayf_lmd")
class AYFLMD(AlignYourFlow):
    __doc__ = f"""AYF's Lagrangian map distillation: the normalised Lagrangian residual against the teacher at the
    landing point (AYF's ablation; reported to over-smooth images).

    {AYF}
    """

    def residual(self, net: CountingNet, x_a: Tensor, a: Tensor, b: Tensor, step: int) -> Term:
        return ayf_lmd_term(net, x_a, a, b, self.teacher(), self.norm)
