"""2-D datasets with a known density: sample quality is measured exactly (KL, docs/methods.md §3.8)."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from orch.methods.contracts.registry import Params
from orch.methods.data.base import DATASETS, Density2D, LabelledParams
from orch.methods.runtime.parallel import Gen, rand, randint, randn


class CheckerboardParams(Params):
    pass


class Checkerboard(Density2D):
    """8 uniform squares of side 0.5 on [−1, 1]²: cell (i, j), i, j ∈ {0..3}, is filled when i + j is even.

    Same law as paper A's rejection sampler (keep u ~ U([0,1]²) with ⌊4u₁⌋ + ⌊4u₂⌋ even, map to 2u − 1), drawn
    directly: a filled cell uniformly, then a uniform point in it. Marginals are U[−1, 1], std 1/√3.
    """

    bounds = (-1.0, 1.0)

    def __init__(self) -> None:
        self.cells = torch.tensor([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0], dtype=torch.float32)
        self.std = torch.full((2,), 1 / math.sqrt(3))

    def sample_labelled(self, n: int, gen: Gen) -> tuple[Tensor, Tensor]:
        idx, u = randint(gen, len(self.cells), n), rand(gen, n, 2)
        return -1 + 0.5 * (self.cells.to(gen.device)[idx] + u), torch.zeros_like(idx)

    def density(self, xy: Tensor) -> Tensor:
        cell = torch.floor((xy + 1) / 0.5)
        inside = ((xy >= -1) & (xy < 1)).all(-1)
        return torch.where(inside & ((cell.sum(-1) % 2) == 0), 0.5, 0.0).to(xy.dtype)


class GMMParams(LabelledParams):
    modes: PositiveInt = 8
    """Number of equal-weight components."""
    radius: Annotated[float, Field(gt=0.0)] = 0.6
    """Radius of the circle the means lie on."""
    scale: Annotated[float, Field(gt=0.0)] = 0.07
    """Standard deviation of each component."""


class GaussianMixture(Density2D):
    """Equal-weight isotropic Gaussians N(μ_k, s²I) with means evenly spaced on a circle of radius r; the class
    of a sample is its component, so each class's density is known exactly."""

    def __init__(self, params: GMMParams):
        self.num_classes = params.modes if params.conditional else None
        angles = 2 * math.pi * torch.arange(params.modes, dtype=torch.float64) / params.modes
        self.means = params.radius * torch.stack([angles.cos(), angles.sin()], -1)
        self.scale = params.scale
        half = params.radius + 6 * params.scale
        self.bounds = (-half, half)
        var = self.means.pow(2).mean(0) + params.scale**2 - self.means.mean(0).pow(2)
        self.std = var.sqrt().float()

    def sample_labelled(self, n: int, gen: Gen) -> tuple[Tensor, Tensor]:
        idx, noise = randint(gen, len(self.means), n), randn(gen, n, 2)
        return self.means.float().to(gen.device)[idx] + self.scale * noise, idx

    def class_frequencies(self) -> Tensor:
        return torch.full((len(self.means),), 1 / len(self.means))

    def class_densities(self, xy: Tensor) -> Tensor:
        """Each component's density at xy (n, 2): shape (n, K)."""
        d2 = (xy[:, None, :].double() - self.means[None]).pow(2).sum(-1)
        return (torch.exp(-d2 / (2 * self.scale**2)) / (2 * math.pi * self.scale**2)).to(xy.dtype)

    def density(self, xy: Tensor) -> Tensor:
        return self.class_densities(xy).mean(-1)


@DATASETS.register("checkerboard", CheckerboardParams, provides=("density",))
def build_checkerboard(params: CheckerboardParams) -> Checkerboard:
    """2-D checkerboard on [−1, 1]² (paper A's checker task)."""
    return Checkerboard()


@DATASETS.register("gmm", GMMParams, provides=("density", "classes"))
def build_gmm(params: GMMParams) -> GaussianMixture:
    """2-D Gaussian mixture on a circle, known density."""
    return GaussianMixture(params)
