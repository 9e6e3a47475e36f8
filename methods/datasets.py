"""Datasets. 2-D datasets have a known density, so sample quality is measured exactly (KL, docs/methods.md §3.8)."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from methods.parallel import Gen, rand, randint, randn
from methods.registry import Params, Registry

DATASETS = Registry("dataset")


class LabelledParams(Params):
    """Options of a dataset that has class labels."""

    conditional: bool = False
    """Train and sample class-conditionally: the network gets each sample's class (docs/guidance.md)."""


class Density2D:
    """A 2-D dataset with a known density on the square [lo, hi]².

    `num_classes` is None unless the dataset is class-conditional; then `sample_labelled` also returns each
    sample's class, and `class_frequencies` are the classes' probabilities.
    """

    shape: tuple[int, ...] = (2,)
    bounds: tuple[float, float]
    std: Tensor
    num_classes: int | None = None

    def sample(self, n: int, gen: Gen) -> Tensor:
        return self.sample_labelled(n, gen)[0]

    def sample_labelled(self, n: int, gen: Gen) -> tuple[Tensor, Tensor]:
        """n samples (n, 2) and their classes (n,) (all 0 for a dataset without classes)."""
        raise NotImplementedError

    def density(self, xy: Tensor) -> Tensor:
        raise NotImplementedError

    def bin_masses(self, bins: int, subdivisions: int = 16, density=None) -> Tensor:
        """Exact-enough probability of each of bins × bins cells under `density` (default: the dataset's):
        midpoint quadrature on a finer sub-grid.

        With 16 sub-cells per bin the checkerboard's square edges fall on sub-cell boundaries, so its masses are
        exact even where a square edge runs through the middle of a bin (the paper's 50 × 50 grid does that).
        """
        lo, hi = self.bounds
        m = bins * subdivisions
        centres = lo + (torch.arange(m, dtype=torch.float64) + 0.5) * (hi - lo) / m
        grid = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1).reshape(-1, 2)
        dens = (density or self.density)(grid).reshape(bins, subdivisions, bins, subdivisions).sum((1, 3))
        return dens / dens.sum()


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
