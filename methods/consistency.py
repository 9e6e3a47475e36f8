"""Consistency models: continuous-time sCT / sCD (TrigFlow, docs/methods.md §5.3) and discrete-time iCT (EDM,
§5.5), written on the canonical flow-map network.

A consistency function maps a noisy point to data. Canonically that is the flow map to τ = 1:
f(I_τ) = X_{τ,1}(I_τ) = I_τ + (1 − τ)·v(I_τ; τ, 1), which meets the boundary condition f = id at the data end by
construction (no c_skip/c_out needed). The papers' own variables map at the boundary (methods/conventions.py):
TrigFlow's x_t = S(t)·I_τ(t), EDM's x_σ = I_τ/τ.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

import torch
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor, nn

from methods.conventions import canonical_to_trigflow, edm_to_canonical, sigma_max_time, trigflow_velocity
from methods.counting import CountingNet
from methods.flow_map import jump, sample_consistency
from methods.interpolants import expand_time
from methods.terms import METHODS, DimReduction, Distance, MethodParams, Setting, TeacherSpec, Term
from methods.time_samplers import LogNormal, LogNormalParams


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


class SCDParams(SCMParams):
    teacher: TeacherSpec = TeacherSpec()
    init_from_teacher: bool = True

    @property
    def uses_teacher(self) -> bool:
        return True


class ContinuousConsistency:
    """sCT (dx_t/dt from the data pair) and sCD (dx_t/dt from the teacher), times from the time sampler (default
    sCM's log-normal), sampled with the multistep consistency sampler from σ_max, NFE = N."""

    def __init__(self, name: str, params: SCMParams, setting: Setting):
        self.name, self.params = name, params
        self.interpolant, self.sigma_data, self.teacher = setting.interpolant, setting.sigma_data, setting.teacher
        self.time_sampler = setting.time_sampler or LogNormal(LogNormalParams(), setting.sigma_data)

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: torch.Generator) -> list[Term]:
        n = x1.shape[0]
        x0 = self.interpolant.sample_base(n, x1.shape[1:], gen)
        tau = self.time_sampler.diagonal(n, gen)
        t = expand_time(canonical_to_trigflow(tau), x1)
        x_t = t.cos() * x1 + t.sin() * x0
        if self.name == "sct":
            dxdt = t.cos() * x0 - t.sin() * x1
        else:
            with torch.no_grad():
                dxdt = trigflow_velocity(self.teacher(x_t / (t.cos() + t.sin()), tau, tau), x_t, t.flatten())
        warmup = min(1.0, step / self.params.warmup_steps) if self.params.warmup_steps else 1.0
        p = self.params
        return [scm_term(self.name, net, x_t, dxdt, tau, warmup, p.tangent_norm, p.prior_weighting, self.sigma_data)]

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: torch.Generator) -> Tensor:
        tau_min = sigma_max_time(self.params.sigma_max, self.sigma_data)
        return sample_consistency(net, x0, nfe, tau_min, self.interpolant.base_std, gen)


@METHODS.register("sct", SCMParams, provides=("time_sampler",))
def build_sct(params: SCMParams, setting: Setting) -> ContinuousConsistency:
    """Continuous-time consistency training (sCM, TrigFlow), tangent normalisation and warm-up."""
    return ContinuousConsistency("sct", params, setting)


@METHODS.register("scd", SCDParams, provides=("time_sampler",))
def build_scd(params: SCDParams, setting: Setting) -> ContinuousConsistency:
    """Continuous-time consistency distillation (sCM) from a flow-matching teacher."""
    return ContinuousConsistency("scd", params, setting)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """EDM's noise levels σ_0 < … < σ_{n−1}, uniform in σ^{1/ρ}."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


class ICTParams(MethodParams):
    sigma_min: PositiveFloat = 0.002
    sigma_max: PositiveFloat = 80.0
    rho: PositiveFloat = 7.0
    p_mean: float = -1.1
    p_std: PositiveFloat = 2.0
    """Discrete log-normal choice of the adjacent pair (σ_i, σ_{i+1})."""
    s0: Annotated[int, Field(ge=2)] = 10
    s1: PositiveInt = 1280
    doubling_steps: PositiveInt = 50000
    """Curriculum N(k) = min(s0·2^⌊k/doubling_steps⌋, s1) + 1 grid points (iCT: K/(log2(s1/s0) + 1))."""
    huber_c: PositiveFloat | None = None
    """Pseudo-Huber c; null = 0.00054·√D (iCT)."""


class ImprovedConsistencyTraining:
    """iCT: f_θ at the noisier of two adjacent Karras levels regressed onto sg f_θ at the other, same noise,
    weight 1/(σ_{i+1} − σ_i), pseudo-Huber distance; multistep consistency sampling from σ_max, NFE = N."""

    def __init__(self, params: ICTParams, setting: Setting):
        self.params, self.interpolant, self.sigma_data = params, setting.interpolant, setting.sigma_data

    def grid_points(self, step: int) -> int:
        p = self.params
        return min(p.s0 * 2 ** (step // p.doubling_steps), p.s1) + 1

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: torch.Generator) -> list[Term]:
        p, n = self.params, x1.shape[0]
        sigmas = karras_sigmas(self.grid_points(step), p.sigma_min, p.sigma_max, p.rho)
        cdf = torch.erf((sigmas.log() - p.p_mean) / (math.sqrt(2) * p.p_std))
        i = torch.multinomial((cdf[1:] - cdf[:-1]).float(), n, replacement=True, generator=gen).to(x1.device)
        sigmas = sigmas.float().to(x1.device)
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

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: torch.Generator) -> Tensor:
        tau_min = sigma_max_time(self.params.sigma_max, self.sigma_data)
        return sample_consistency(net, x0, nfe, tau_min, self.interpolant.base_std, gen)


@METHODS.register("ict", ICTParams)
def build_ict(params: ICTParams, setting: Setting) -> ImprovedConsistencyTraining:
    """Improved discrete-time consistency training (iCT): Karras grid curriculum, pseudo-Huber."""
    return ImprovedConsistencyTraining(params, setting)
