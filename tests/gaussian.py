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
