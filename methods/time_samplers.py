"""Time samplers: which (a, b) jumps a batch trains on. A registry, because the sampler is an ablation axis."""

from __future__ import annotations

import torch
from pydantic import NonNegativeInt
from torch import Tensor

from methods.registry import Params, Registry

TIME_SAMPLERS = Registry("time sampler")


class UniformTriangleParams(Params):
    fm_steps: NonNegativeInt = 0
    """Optional curriculum (METHODS.md §3.3, paper A F.2): train the diagonal only for this many steps..."""
    anneal_steps: NonNegativeInt = 0
    """...then widen the jumps linearly: b ← min(b, a + δ(k)), δ(k) = (k − fm_steps)/anneal_steps. 0 = off."""


class UniformTriangle:
    """Diagonal times τ ~ U[0, 1]; off-diagonal (a, b) uniform on the triangle 0 ≤ a < b ≤ 1 (density 2).

    Paper A's sampler: a = min(U1, U2), b = max(U1, U2). The diagonal-first curriculum is off by default, as in
    every run of the paper.
    """

    def __init__(self, params: UniformTriangleParams):
        self.fm_steps = params.fm_steps
        self.anneal_steps = params.anneal_steps

    def diagonal_only(self, step: int) -> bool:
        return step < self.fm_steps

    def diagonal(self, n: int, gen: torch.Generator) -> Tensor:
        return torch.rand(n, generator=gen, device=gen.device)

    def offdiagonal(self, n: int, step: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        u = torch.rand(2, n, generator=gen, device=gen.device)
        a, b = u.min(0).values, u.max(0).values
        if self.anneal_steps:
            width = min(1.0, (step - self.fm_steps) / self.anneal_steps)
            b = torch.minimum(b, a + width)
        return a, b


@TIME_SAMPLERS.register("uniform_triangle", UniformTriangleParams)
def build_uniform_triangle(params: UniformTriangleParams) -> UniformTriangle:
    """Uniform diagonal times and uniform upper-triangle jumps (paper A), optional diagonal-first curriculum."""
    return UniformTriangle(params)
