"""The exact flow map of Gaussian data under the linear interpolant, for tests that pin the mathematics.

x0 ~ N(0, σ0²), x1 ~ N(m, s²) per coordinate, I_τ = (1 − τ)x0 + τx1 ~ N(m_τ, σ_τ²) with m_τ = τm and
σ_τ² = (1 − τ)²σ0² + τ²s². The flow map is affine: X_{a,b}(x) = m_b + (σ_b/σ_a)(x − m_a).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ExactGaussianFlowMap(nn.Module):
    """v(x; a, b) = (X_{a,b}(x) − x)/(b − a) in closed form, smooth through a = b (where it is the velocity).

    (σ_b − σ_a)/(b − a) = [−(2 − a − b)σ0² + (a + b)s²]/(σ_a + σ_b), so
    v(x; a, b) = m + [−(2 − a − b)σ0² + (a + b)s²]/((σ_a + σ_b)σ_a) · (x − a·m).
    """

    def __init__(self, sigma0: Tensor, mean: Tensor, std: Tensor):
        super().__init__()
        self.sigma0, self.mean, self.std = sigma0, mean, std

    def sigma(self, t: Tensor) -> Tensor:
        return ((1 - t) ** 2 * self.sigma0**2 + t**2 * self.std**2).sqrt()

    def forward(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        a, b = a[:, None], b[:, None]
        s_a, s_b = self.sigma(a), self.sigma(b)
        slope = (-(2 - a - b) * self.sigma0**2 + (a + b) * self.std**2) / ((s_a + s_b) * s_a)
        return self.mean + slope * (x - a * self.mean)

    def exact_jump(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        a, b = a[:, None], b[:, None]
        return b * self.mean + self.sigma(b) / self.sigma(a) * (x - a * self.mean)


def gaussian_2d() -> ExactGaussianFlowMap:
    d = torch.float64
    return ExactGaussianFlowMap(
        sigma0=torch.tensor([0.8, 1.3], dtype=d),
        mean=torch.tensor([1.5, -0.7], dtype=d),
        std=torch.tensor([0.4, 2.0], dtype=d),
    )


class ExactMixtureVelocity(nn.Module):
    """The exact velocities of isotropic Gaussian-mixture data N(μ_k, s²I), weights π_k, under the linear
    interpolant with base N(0, diag(σ0²)): given class k, I_τ ~ N(τμ_k, σ_τ²) with σ_τ² = (1 − τ)²σ0² + τ²s², so

        v_k(x, τ) = μ_k + (σ_τ'/σ_τ)·(x − τμ_k),   σ_τ σ_τ' = −(1 − τ)σ0² + τs²,

    and the unconditional velocity is the posterior mixture v_∅ = Σ_k p(k | x, τ)·v_k. Labels select v_k; the
    null label (= K) and no labels give v_∅. v(x; a, b) is the velocity at a (a diagonal-only network, for
    samplers that evaluate the diagonal). Shapes: x (n, 2), a, b, labels (n,).
    """

    def __init__(self, means: Tensor, scale: float, sigma0: Tensor, weights: Tensor | None = None):
        super().__init__()
        self.means, self.scale, self.sigma0 = means.double(), scale, sigma0.double()
        self.weights = torch.full((len(means),), 1 / len(means), dtype=torch.float64) if weights is None else weights

    def class_velocities(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Each class's velocity (n, K, 2) and its log-density of x at t plus log π_k (n, K)."""
        t = t.double()[:, None, None]
        var = (1 - t) ** 2 * self.sigma0**2 + t**2 * self.scale**2  # (n, 1, 2)
        rate = (-(1 - t) * self.sigma0**2 + t * self.scale**2) / var  # σ'/σ
        centred = x.double()[:, None, :] - t * self.means[None]
        v = self.means[None] + rate * centred
        log_p = (-0.5 * centred**2 / var - 0.5 * var.log()).sum(-1) + self.weights.log()[None]
        return v, log_p

    def forward(self, x: Tensor, a: Tensor, b: Tensor, labels: Tensor | None = None, omega=None) -> Tensor:
        v, log_p = self.class_velocities(x, a)
        v_null = (torch.softmax(log_p, dim=1)[..., None] * v).sum(1)
        if labels is None:
            return v_null.to(x.dtype)
        k = labels.clamp(max=len(self.means) - 1)
        v_cond = v[torch.arange(len(x)), k]
        return torch.where((labels == len(self.means))[:, None], v_null, v_cond).to(x.dtype)
