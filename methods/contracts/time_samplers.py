"""Time samplers: which times and (a, b) jumps a batch trains on, in the canonical convention (τ = 0 noise,
τ = 1 data). A registry, because the sampler is an ablation axis usable by every method that samples times.

Each sampler is a law of one time τ (its marginal); a jump is two independent draws, ordered so that a < b
(paper A's triangle for the uniform law; MeanFlow's "two draws, sorted").
"""

from __future__ import annotations

import torch
from pydantic import NonNegativeInt, PositiveFloat
from torch import Tensor

from orch.methods.contracts.conventions import edm_to_canonical
from orch.methods.contracts.registry import Params, Registry
from orch.methods.runtime.parallel import Gen, rand, randn

TIME_SAMPLERS = Registry("time sampler")


class TimeSamplerParams(Params):
    fm_steps: NonNegativeInt = 0
    """Optional curriculum (docs/methods.md §3.3, paper A F.2): train the diagonal only for this many steps..."""
    anneal_steps: NonNegativeInt = 0
    """...then widen the jumps linearly: b ← min(b, a + δ(k)), δ(k) = (k − fm_steps)/anneal_steps. 0 = off."""


class TimeSampler:
    """Diagonal times τ ~ marginal; jumps (a, b) = two ordered draws. The curriculum is off by default, as in
    every run of paper A."""

    def __init__(self, params: TimeSamplerParams):
        self.fm_steps = params.fm_steps
        self.anneal_steps = params.anneal_steps

    def marginal(self, n: int, gen: Gen) -> Tensor:
        raise NotImplementedError

    def diagonal_only(self, step: int) -> bool:
        return step < self.fm_steps

    def diagonal(self, n: int, gen: Gen) -> Tensor:
        return self.marginal(n, gen)

    def offdiagonal(self, n: int, step: int, gen: Gen) -> tuple[Tensor, Tensor]:
        u = torch.stack([self.marginal(n, gen), self.marginal(n, gen)])
        a, b = u.min(0).values, u.max(0).values
        if self.anneal_steps:
            width = min(1.0, (step - self.fm_steps) / self.anneal_steps)
            b = torch.minimum(b, a + width)
        return a, b


class Uniform(TimeSampler):
    """τ ~ U[0, 1]; jumps uniform on the triangle 0 ≤ a < b ≤ 1 (density 2): paper A's sampler."""

    def marginal(self, n: int, gen: Gen) -> Tensor:
        return rand(gen, n)


class LogitNormalParams(TimeSamplerParams):
    mean: float = -0.4
    """Mean of the normal before the sigmoid."""
    std: PositiveFloat = 1.0
    """Its std."""


class LogitNormal(TimeSampler):
    """The noise level t = sigmoid(mean + std·n), n ~ N(0, 1), in MeanFlow's convention (t = 1 noise), so
    τ = 1 − t. MeanFlow's ImageNet default (−0.4, 1.0); its CIFAR-10 setting is (−2.0, 2.0)."""

    def __init__(self, params: LogitNormalParams):
        super().__init__(params)
        self.mean, self.std = params.mean, params.std

    def marginal(self, n: int, gen: Gen) -> Tensor:
        noise = randn(gen, n)
        return torch.sigmoid(-(self.mean + self.std * noise))


class LogNormalParams(TimeSamplerParams):
    p_mean: float = -1.0
    """Mean of log σ."""
    p_std: PositiveFloat = 1.4
    """Std of log σ."""
    sigma_min: PositiveFloat = 0.002
    """σ is clamped from below to this."""
    sigma_max: PositiveFloat = 80.0
    """…and from above to this."""


class LogNormal(TimeSampler):
    """sCM's sampler: noise level σ = exp(p_mean + p_std·n) clamped to [σ_min, σ_max], i.e. TrigFlow time
    t = arctan(σ/σ_d), which is τ = σ_d/(σ_d + σ) canonically. sCM's CIFAR-10 default (−1.0, 1.4)."""

    def __init__(self, params: LogNormalParams, sigma_data: float):
        super().__init__(params)
        self.params, self.sigma_data = params, sigma_data

    def marginal(self, n: int, gen: Gen) -> Tensor:
        p = self.params
        sigma = (p.p_mean + p.p_std * randn(gen, n)).exp()
        return edm_to_canonical(sigma.clamp(p.sigma_min, p.sigma_max), self.sigma_data)


@TIME_SAMPLERS.register("auto")
def build_auto(params: Params, sigma_data: float) -> None:
    """Each method's own default: uniform for flow matching, paper A and paper B; logit_normal for meanflow;
    lognormal for sct/scd; shortcut and ict use their own discrete schedules."""
    return None


@TIME_SAMPLERS.register("uniform", TimeSamplerParams)
def build_uniform(params: TimeSamplerParams, sigma_data: float) -> Uniform:
    """Uniform times and uniform upper-triangle jumps (paper A), optional diagonal-first curriculum."""
    return Uniform(params)


@TIME_SAMPLERS.register("logit_normal", LogitNormalParams)
def build_logit_normal(params: LogitNormalParams, sigma_data: float) -> LogitNormal:
    """Logit-normal noise level (MeanFlow, SD3); jumps are two sorted draws."""
    return LogitNormal(params)


@TIME_SAMPLERS.register("lognormal", LogNormalParams)
def build_lognormal(params: LogNormalParams, sigma_data: float) -> LogNormal:
    """Log-normal σ as in sCM/EDM, mapped to canonical time; jumps are two sorted draws."""
    return LogNormal(params, sigma_data)
