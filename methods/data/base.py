"""The dataset registry and the dataset kinds metrics rely on: 2-D densities and labelled options."""

from __future__ import annotations

import torch
from torch import Tensor

from orch.methods.contracts.registry import Params, Registry
from orch.methods.runtime.parallel import Gen

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

    def class_densities(self, xy: Tensor) -> Tensor:
        """Each class's density at xy (n, 2): shape (n, K) (datasets that provide "classes")."""
        raise NotImplementedError

    def bin_masses(self, bins: int, subdivisions: int = 16) -> Tensor:
        """Exact-enough probability of each of bins × bins cells: midpoint quadrature on a finer sub-grid.

        With 16 sub-cells per bin the checkerboard's square edges fall on sub-cell boundaries, so its masses are
        exact even where a square edge runs through the middle of a bin (the paper's 50 × 50 grid does that).
        """
        return self.masses_of(self.density, bins, subdivisions)[..., 0]

    def class_bin_masses(self, bins: int, subdivisions: int = 16) -> Tensor:
        """bin_masses of each class's density, shape (bins, bins, K): the class densities evaluated once."""
        return self.masses_of(self.class_densities, bins, subdivisions)

    def masses_of(self, density, bins: int, subdivisions: int) -> Tensor:
        """Cell masses (bins, bins, C) of `density`, which maps points (n, 2) to (n,) or (n, C) densities."""
        lo, hi = self.bounds
        m = bins * subdivisions
        centres = lo + (torch.arange(m, dtype=torch.float64) + 0.5) * (hi - lo) / m
        grid = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1).reshape(-1, 2)
        dens = density(grid).reshape(bins, subdivisions, bins, subdivisions, -1).sum((1, 3))
        return dens / dens.sum((0, 1))
