"""The KL metric against cases with known answers."""

import math

import pytest
import torch

from orch.methods.data.toy2d import Checkerboard, GaussianMixture, GMMParams
from orch.methods.evaluation.kl import histogram_kl


def test_bin_masses_are_exact_where_square_edges_cut_bins():
    masses = Checkerboard().bin_masses(50)
    assert masses.sum().item() == pytest.approx(1.0)
    # bin 12 spans [−0.52, −0.48]: the edge at −0.5 halves it, so it holds half a full bin's mass
    full = masses[0, 0].item()
    assert masses[12, 0].item() == pytest.approx(full / 2)
    assert masses[12, 12].item() == pytest.approx(full / 2)  # quarter filled + quarter filled by the diagonal cell
    assert masses[0, 13].item() == 0


def test_kl_of_exact_samples_is_only_the_finite_sample_bias():
    data = Checkerboard()
    samples = data.sample(200_000, torch.Generator().manual_seed(0))
    occupied = int((data.bin_masses(50) > 0).sum())
    bias = (occupied - 1) / (2 * 200_000)
    assert histogram_kl(samples, data) < 3 * bias


def test_kl_of_uniform_samples_is_the_exact_binned_kl():
    """Uniform on [−1, 1]² puts 1/2500 in every cell, so the expected score is Σ p_i log(2500 p_i) exactly. It is
    below the continuous KL(board ‖ uniform) = log 2 because cells cut by a square edge hide part of the
    difference (binning can only lose information)."""
    data = Checkerboard()
    p = data.bin_masses(50).reshape(-1)
    binned = float((p[p > 0] * (p[p > 0] * 2500).log()).sum())
    assert 0.6 < binned < math.log(2)
    samples = torch.rand(400_000, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert histogram_kl(samples, data) == pytest.approx(binned, abs=0.005)


def test_kl_counts_mass_outside_the_square_and_ignores_non_finite_samples():
    data = Checkerboard()
    samples = data.sample(100_000, torch.Generator().manual_seed(2))
    half_outside = torch.cat([samples[:50_000], torch.full((50_000, 2), 5.0)])
    # half the mass lost outside: every cell's model mass halves, which adds exactly log 2
    assert histogram_kl(half_outside, data) - histogram_kl(samples, data) == pytest.approx(math.log(2), abs=0.02)
    with_nan = torch.cat([samples, torch.full((10, 2), float("nan"))])
    assert math.isfinite(histogram_kl(with_nan, data))


def test_gmm_exact_samples_score_near_zero_and_a_shifted_mixture_does_not():
    data = GaussianMixture(GMMParams())
    gen = torch.Generator().manual_seed(3)
    samples = data.sample(200_000, gen)
    assert histogram_kl(samples, data) < 0.02
    assert histogram_kl(samples + 0.1, data) > 0.3
