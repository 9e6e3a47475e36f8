"""The papers' time conventions, mapped to the canonical one at the boundary (docs/methods.md §1).

Canonical: I_τ = (1 − τ)·x0 + τ·x1, τ = 0 noise (x0 ~ base, std σ_d), τ = 1 data; a jump goes from a to b and
the network returns the average velocity v(x; a, b). The other conventions describe the same paths:

* TrigFlow (sCM; paper B's CIFAR-10 setup): x_t = cos t·x1 + sin t·x0, t = π/2 noise. With S(t) = cos t + sin t,
  x_t = S(t)·I_τ where τ = cos t / S(t) = 1/(1 + tan t).
* EDM (iCT): x_σ = x1 + σ·n, n ~ N(0, I), so with x0 = σ_d·n, x_σ = I_τ/τ where τ = σ_d/(σ_d + σ).
* MeanFlow: z_t = (1 − t)·x1 + t·x0, t = 1 noise: t = 1 − τ, and u(z; t, r) = −v(z; 1 − t, 1 − r).
* Paper B's released code (SiT): same interpolant as canonical, f(x; t, s) jumps from t to s: a = t, b = s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orch.methods.contracts.interpolants import expand_time


def trigflow_to_canonical(t: Tensor) -> Tensor:
    """τ(t) = cos t / (cos t + sin t)."""
    return t.cos() / (t.cos() + t.sin())


def canonical_to_trigflow(tau: Tensor) -> Tensor:
    """t(τ) = atan2(1 − τ, τ) ∈ [0, π/2]."""
    return torch.atan2(1 - tau, tau)


def trigflow_scale(t: Tensor) -> Tensor:
    """S(t) = cos t + sin t, with x_t = S(t)·I_τ(t)."""
    return t.cos() + t.sin()


def trigflow_velocity(u: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """dx_t/dt of TrigFlow from a canonical velocity u = dI/dτ evaluated at (x_t/S, τ(t)).

    Differentiating x_t = S·I_τ(t) with S' = cos t − sin t and τ'(t) = −1/S² gives
    dx_t/dt = ((cos t − sin t)·x_t − u)/S.
    """
    t = expand_time(t, x_t)
    return ((t.cos() - t.sin()) * x_t - u) / (t.cos() + t.sin())


def edm_to_canonical(sigma: Tensor, sigma_data: float) -> Tensor:
    """τ(σ) = σ_d/(σ_d + σ)."""
    return sigma_data / (sigma_data + sigma)


def canonical_to_edm(tau: Tensor, sigma_data: float) -> Tensor:
    """σ(τ) = σ_d(1 − τ)/τ."""
    return sigma_data * (1 - tau) / tau


def edm_velocity(u: Tensor, x_sigma: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """dx_σ/dσ of the EDM probability-flow ODE from a canonical velocity u at (τ·x_σ, τ(σ)).

    EDM's ODE is dx/dσ = (x − D)/σ with the denoiser D = E[x1 | x_σ] = I_τ + (1 − τ)·u (since x1 = I_τ +
    (1 − τ)(x1 − x0)).
    """
    tau = expand_time(edm_to_canonical(sigma, sigma_data), x_sigma)
    denoised = tau * x_sigma + (1 - tau) * u
    return (x_sigma - denoised) / expand_time(sigma, x_sigma)


def meanflow_to_canonical(t: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """MeanFlow's jump t → r (t noisier) is the canonical jump a = 1 − t → b = 1 − r."""
    return 1 - t, 1 - r


def sigma_max_time(sigma_max: float, sigma_data: float) -> float:
    """Canonical time of the largest noise level: where consistency samplers start (σ_max = 80 in sCM/iCT)."""
    return sigma_data / (sigma_data + sigma_max)
