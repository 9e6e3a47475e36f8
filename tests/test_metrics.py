"""The KL metric against cases with known answers."""

import math

import pytest
import torch

from orch.methods.contracts.metric_keys import (
    EVAL,
    FINAL,
    EvalKey,
    eval_key,
    parse_eval_key,
    parse_target_std_key,
    parse_term_loss_key,
    seed_key,
    spread_key,
    target_std_key,
    term_loss_key,
)
from orch.methods.data.toy2d import Checkerboard, GaussianMixture, GMMParams
from orch.methods.evaluation.kl import histogram_kl
from orch.methods.evaluation.metric import register_metric


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


@pytest.mark.parametrize("omega", [1.0, 1.5, 2.0, 0.0, 7.25, 1e-5, 1 / 3])
@pytest.mark.parametrize("source", [EVAL, FINAL])
def test_every_evaluation_key_parses_back_to_what_built_it(source, omega):
    key = eval_key("kl_cond", 8, omega, source)
    assert parse_eval_key(key) == EvalKey(source, "kl_cond", 8, omega)
    assert (omega == 1.0) == ("/cfg_" not in key)  # the unguided names carry no scale
    seed, spread = parse_eval_key(seed_key("fid", 2, omega, 3)), parse_eval_key(spread_key("fid", 2, omega))
    assert (seed.source, seed.rest, seed.nfe, seed.omega) == (FINAL, "seed_3", 2, omega)
    assert (spread.rest, spread.omega) == ("spread", omega)


def test_keys_that_are_not_evaluations_parse_to_nothing_and_training_keys_name_their_term():
    for key in ("train/loss", "cost/device_hours", "eval/kl", "eval/kl/nfe_x", "eval/KL/nfe_1", "best/kl/nfe_1"):
        assert parse_eval_key(key) is None, key
    assert parse_term_loss_key(term_loss_key("fm")) == "fm" and parse_term_loss_key("train/loss") is None
    assert parse_target_std_key(target_std_key("lsd", 3)) == ("lsd", 3)
    assert parse_target_std_key(target_std_key("lsd")) == ("lsd", None)


def test_a_metric_whose_keys_would_not_parse_back_is_refused():
    with pytest.raises(ValueError, match="metric name 'Near-2'"):
        register_metric("Near-2", direction="min", title="near")
