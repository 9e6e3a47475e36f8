"""Consistency models: continuous-time sCT / sCD (TrigFlow, docs/methods.md §5.3) and discrete-time iCT (EDM,
§5.5), written on the canonical flow-map network.

A consistency function maps a noisy point to data. Canonically that is the flow map to τ = 1:
f(I_τ) = X_{τ,1}(I_τ) = I_τ + (1 − τ)·v(I_τ; τ, 1), which meets the boundary condition f = id at the data end by
construction (no c_skip/c_out needed). The papers' own variables map at the boundary (methods/contracts/conventions.py):
TrigFlow's x_t = S(t)·I_τ(t), EDM's x_σ = I_τ/τ.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

import torch
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor, nn

from orch.methods.contracts.conventions import (
    canonical_to_trigflow,
    edm_to_canonical,
    sigma_max_time,
    trigflow_velocity,
)
from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.flow_map import jump, sample_consistency
from orch.methods.contracts.interpolants import expand_time
from orch.methods.contracts.method import (
    DimReduction,
    Distance,
    Method,
    MethodParams,
    Setting,
    Term,
    register_method,
)
from orch.methods.contracts.teacher import DistillationParams, DistilsTeacher
from orch.methods.contracts.time_samplers import LogNormal, LogNormalParams
from orch.methods.runtime.parallel import Gen, multinomial
from orch.methods.runtime.precision import at_least_fp32


def scm_term(
    name: str,
    net: CountingNet,
    x_t: Tensor,
    dxdt: Tensor,
    tau: Tensor,
    warmup: float,
    norm_c: float,
    prior_weighting: bool,
    sigma_data: float,
) -> Term:
    """sCM's continuous-time consistency loss ‖F_θ − F⁻ − g‖² (F⁻ = sg F_θ) on the canonical network.

    TrigFlow's network output F relates to the canonical v = v(x_t/S; τ, 1) by
        F = ((cos t − sin t)·x_t − v)/(S σ_d)   (so that f = cos t·x_t − sin t·σ_d·F = X_{τ,1}(x_t/S)),
    hence F_θ − F⁻ − g = −(v_θ − (v⁻ − S σ_d g))/(S σ_d): the term regresses v_θ onto sg(v⁻ − S σ_d g) with weight
    1/(S σ_d)². The tangent g = −cos²t(σ_d F⁻ − dx_t/dt) − w_k(cos t sin t·x_t + σ_d cos t sin t·dF⁻/dt) uses
    dF⁻/dt from one no-grad JVP along (dx_t/dt, 1); it is normalised g/(‖g‖/√D + c) and warmed up by w_k.
    Paper B's measured target is d/dt f⁻ (the JVP-based quantity whose variance grows).
    """
    t = canonical_to_trigflow(tau)
    cos, sin = expand_time(t.cos(), x_t), expand_time(t.sin(), x_t)
    scale = cos + sin
    ones = torch.ones_like(tau)
    pred = net(x_t / scale, tau, ones)
    with torch.no_grad():
        d_state = dxdt / scale - x_t * (cos - sin) / scale**2  # d/dt (x_t/S)
        d_tau = -1 / (t.cos() + t.sin()) ** 2
        v, dv_dt = net.jvp((x_t / scale, tau, ones), (d_state, d_tau, torch.zeros_like(tau)))
        F = ((cos - sin) * x_t - v) / (scale * sigma_data)
        dF_dt = (-(sin + cos) * x_t + (cos - sin) * dxdt - dv_dt) / (scale * sigma_data) - F * (cos - sin) / scale
        g = -(cos**2) * (sigma_data * F - dxdt) - warmup * (cos * sin * x_t + sigma_data * cos * sin * dF_dt)
        dims = x_t[0].numel()
        g = g / (expand_time(g.flatten(1).norm(dim=1), g) / math.sqrt(dims) + norm_c)
        target = v - scale * sigma_data * g
        df_dt = -sin * x_t + cos * dxdt - cos * sigma_data * F - sin * sigma_data * dF_dt
    weight = 1 / (t.cos() + t.sin()) ** 2 / sigma_data**2
    if prior_weighting:
        weight = weight / (sigma_data * torch.tan(t))  # sCM's 1/σ prior weight
    return Term(name, pred, target, tau, ones, weight=weight, measured=df_dt)


class SCMParams(MethodParams):
    reference_reduction: ClassVar[DimReduction] = "mean_div_d"  # the sCM reference: e^{−w}/D · mean_d(·)
    warmup_steps: NonNegativeInt = 10000
    """Tangent warm-up: the second part of g is scaled by min(1, k/warmup_steps) (sCM)."""
    tangent_norm: PositiveFloat = 0.1
    """c of the tangent normalisation g/(‖g‖/√D + c)."""
    prior_weighting: bool = True
    """Weight 1/σ (FastGen's CIFAR-10 setting; reported unstable by others)."""
    sigma_max: PositiveFloat = 80.0
    """Largest noise level: where the sampler starts (t_max = arctan(σ_max/σ_d))."""


class SCDParams(SCMParams, DistillationParams):
    """sCM's options and the teacher's (dx_t/dt comes from the teacher's velocity b̂)."""


SCM = """C. Lu, Y. Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", 2024,
    arXiv:2410.11081."""


class ContinuousConsistency(Method):
    """sCT and sCD: times from the time sampler (default sCM's log-normal), the continuous-time consistency loss
    (scm_term) with `dxdt` the tangent of the trajectory, sampled with the multistep consistency sampler from
    σ_max, NFE = N."""

    Params = SCMParams
    term: ClassVar[str]

    def __init__(self, params: SCMParams, setting: Setting):
        super().__init__(params, setting)
        self.time_sampler = setting.time_sampler or LogNormal(LogNormalParams(), setting.sigma_data)

    def dxdt(self, x_t: Tensor, x0: Tensor, x1: Tensor, t: Tensor, tau: Tensor) -> Tensor:
        """dx_t/dt in TrigFlow time. Shapes: x_t, x0, x1 (n, *data_shape); t broadcast against them; tau (n,)."""
        raise NotImplementedError

    def expected_passes(self, batch: int) -> tuple[float, float]:
        return 1.0 + self.tangent_passes(), 1.0  # the student's forward, the no-grad JVP for the target

    def tangent_passes(self) -> int:
        """Evaluations that give dx_t/dt: none for sCT (x1 − x0)."""
        return 0

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        n, p = x1.shape[0], self.params
        x0 = self.setting.interpolant.sample_base(n, x1.shape[1:], gen)
        tau = self.time_sampler.diagonal(n, gen)
        t = expand_time(canonical_to_trigflow(tau), x1)
        x_t = t.cos() * x1 + t.sin() * x0
        dxdt = self.dxdt(x_t, x0, x1, t, tau)
        warmup = min(1.0, step / p.warmup_steps) if p.warmup_steps else 1.0
        sigma_data = self.setting.sigma_data
        return [scm_term(self.term, net, x_t, dxdt, tau, warmup, p.tangent_norm, p.prior_weighting, sigma_data)]

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: Gen) -> Tensor:
        tau_min = sigma_max_time(self.params.sigma_max, self.setting.sigma_data)
        return sample_consistency(net, x0, nfe, tau_min, self.setting.interpolant.base_std, gen)


@register_method("sct")
class SCT(ContinuousConsistency):
    __doc__ = f"""Continuous-time consistency training (sCM, TrigFlow), tangent normalisation and warm-up:
    dx_t/dt = cos t·x0 − sin t·x1 from the data pair.

    {SCM}
    """

    term = "sct"

    def dxdt(self, x_t: Tensor, x0: Tensor, x1: Tensor, t: Tensor, tau: Tensor) -> Tensor:
        return t.cos() * x0 - t.sin() * x1


@register_method("scd")
class SCD(DistilsTeacher, ContinuousConsistency):
    __doc__ = f"""Continuous-time consistency distillation (sCM) from a flow-matching teacher: dx_t/dt is the
    teacher's velocity at x_t.

    {SCM}
    """

    Params, term = SCDParams, "scd"

    def tangent_passes(self) -> int:
        return self.teacher_passes()

    def dxdt(self, x_t: Tensor, x0: Tensor, x1: Tensor, t: Tensor, tau: Tensor) -> Tensor:
        with torch.no_grad():
            velocity = self.teacher()(x_t / (t.cos() + t.sin()), tau)
            return trigflow_velocity(velocity, x_t, t.flatten())


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """EDM's noise levels σ_0 < … < σ_{n−1}, uniform in σ^{1/ρ}."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


class ICTParams(MethodParams):
    sigma_min: PositiveFloat = 0.002
    """Smallest noise level of the Karras grid."""
    sigma_max: PositiveFloat = 80.0
    """Largest noise level: where the sampler starts."""
    rho: PositiveFloat = 7.0
    """Karras grid exponent: σ_i = (σ_max^{1/ρ} + i/N·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ."""
    p_mean: float = -1.1
    """Mean of the discrete log-normal choice of the adjacent pair (σ_i, σ_{i+1})."""
    p_std: PositiveFloat = 2.0
    """Its std."""
    s0: Annotated[int, Field(ge=2)] = 10
    """Grid intervals at the start of the curriculum."""
    s1: PositiveInt = 1280
    """Grid intervals at its end."""
    doubling_steps: PositiveInt = 50000
    """Curriculum N(k) = min(s0·2^⌊k/doubling_steps⌋, s1) + 1 grid points (iCT: K/(log2(s1/s0) + 1))."""
    huber_c: PositiveFloat | None = None
    """Pseudo-Huber c; null = 0.00054·√D (iCT)."""


@register_method("ict")
class ImprovedConsistencyTraining(Method):
    """Improved discrete-time consistency training (iCT): Karras grid curriculum, pseudo-Huber.

    f_θ at the noisier of two adjacent Karras levels regressed onto sg f_θ at the other, same noise, weight
    1/(σ_{i+1} − σ_i), pseudo-Huber distance; multistep consistency sampling from σ_max, NFE = N.

    Y. Song, P. Dhariwal, "Improved Techniques for Training Consistency Models", 2023, arXiv:2310.14189 (after
    Y. Song, P. Dhariwal, M. Chen, I. Sutskever, "Consistency Models", 2023, arXiv:2303.01469).
    """

    Params, own_times = ICTParams, True

    def __init__(self, params: ICTParams, setting: Setting):
        super().__init__(params, setting)
        self.interpolant, self.sigma_data = setting.interpolant, setting.sigma_data

    def expected_passes(self, batch: int) -> tuple[float, float]:
        return 2.0, 0.0  # the student at σ_{i+1}, the no-grad target at σ_i

    def grid_points(self, step: int) -> int:
        p = self.params
        return min(p.s0 * 2 ** (step // p.doubling_steps), p.s1) + 1

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        p, n = self.params, x1.shape[0]
        sigmas = karras_sigmas(self.grid_points(step), p.sigma_min, p.sigma_max, p.rho)
        cdf = torch.erf((sigmas.log() - p.p_mean) / (math.sqrt(2) * p.p_std))
        i = multinomial(gen, (cdf[1:] - cdf[:-1]).float(), n).to(x1.device)
        sigmas = sigmas.to(x1.device, at_least_fp32(x1))
        lo, hi = sigmas[i], sigmas[i + 1]
        tau_lo, tau_hi = edm_to_canonical(lo, self.sigma_data), edm_to_canonical(hi, self.sigma_data)
        x0 = self.interpolant.sample_base(n, x1.shape[1:], gen)
        ones = torch.ones_like(lo)
        pred = jump(net, self.interpolant.interpolate(x0, x1, tau_hi), tau_hi, ones)
        with torch.no_grad():
            target = jump(net, self.interpolant.interpolate(x0, x1, tau_lo), tau_lo, ones)
            dt = canonical_to_trigflow(tau_hi) - canonical_to_trigflow(tau_lo)
            measured = (pred - target) / expand_time(dt, pred)  # paper B's finite-difference CM target
        c = p.huber_c if p.huber_c is not None else 0.00054 * math.sqrt(x1[0].numel())
        return [Term("ict", pred, target, tau_hi, ones, 1 / (hi - lo), Distance("pseudo_huber", c), measured)]

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: Gen) -> Tensor:
        tau_min = sigma_max_time(self.params.sigma_max, self.sigma_data)
        return sample_consistency(net, x0, nfe, tau_min, self.interpolant.base_std, gen)
