"""The linear interpolant with a Gaussian base scaled to the data std (docs/methods.md §1)."""

from __future__ import annotations

import torch
from torch import Tensor

from orch.methods.runtime.parallel import Gen, randn


def expand_time(t: Tensor, x: Tensor) -> Tensor:
    """Shape a per-sample time (batch,) so that it broadcasts against x (batch, ...)."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


class LinearInterpolant:
    """I_τ = (1 − (1 − σ_min)τ)·x0 + τ·x1 with x0 ~ N(0, diag(σ²)), x1 ~ data; conditional velocity
    İ_τ = x1 − (1 − σ_min)·x0. σ_min = 0 (every method but one) is the plain (1 − τ)·x0 + τ·x1.

    Args:
        base_std: per-coordinate std σ of the Gaussian base, shape (*data_shape) or scalar. Paper A scales the
            base to the data std ("adaptive" base): 1/√3 per coordinate on the checkerboard, 0.5 for images.
        sigma_min: the noise left at τ = 1 (shortcut models' reference uses 1e−5).
    """

    def __init__(self, base_std: Tensor, sigma_min: float = 0.0):
        self.base_std, self.sigma_min = base_std, sigma_min

    def sample_base(self, n: int, shape: tuple[int, ...], gen: Gen | None = None) -> Tensor:
        """n base samples x0 (n, *shape); without `gen`, from torch's global generator on the CPU."""
        if gen is None:
            return torch.randn((n, *shape)) * self.base_std
        return randn(gen, n, *shape) * self.base_std.to(gen.device)

    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        t = expand_time(t, x0)
        return (1 - (1 - self.sigma_min) * t) * x0 + t * x1

    def velocity(self, x0: Tensor, x1: Tensor) -> Tensor:
        return x1 - (1 - self.sigma_min) * x0
