"""Smaller pieces with exact expected behaviour: learned weighting, time sampling, EMA, registries."""

import pytest
import torch

from orch.methods.catalog import METHODS
from orch.methods.contracts.registry import UnknownName
from orch.methods.contracts.time_samplers import (
    LogitNormal,
    LogitNormalParams,
    LogNormal,
    LogNormalParams,
    TimeSamplerParams,
    Uniform,
)
from orch.methods.training.ema import EMA
from orch.methods.training.loss_weight import LogVarWeight


def test_learned_log_variance_converges_to_the_conditional_mean_loss():
    """Minimising E[e^{−w}ℓ + w] gives e^{w(a,b)} = E[ℓ | a, b] (docs/methods.md §2.2)."""
    torch.manual_seed(0)
    weight = LogVarWeight()
    opt = torch.optim.Adam(weight.parameters(), lr=2e-2)
    for _ in range(1500):
        a, b = torch.rand(512), torch.rand(512)
        ell = (1 + 3 * a) * torch.distributions.Exponential(1.0).sample((512,))  # E[ℓ | a, b] = 1 + 3a
        w = weight(a, b)
        loss = (torch.exp(-w) * ell + w).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    a = torch.linspace(0.05, 0.95, 10)
    with torch.no_grad():
        fitted = weight(a, torch.full_like(a, 0.5)).exp()
    torch.testing.assert_close(fitted, 1 + 3 * a, rtol=0.1, atol=0)


def test_uniform_sampler_and_the_diagonal_first_curriculum():
    gen = torch.Generator().manual_seed(0)
    plain = Uniform(TimeSamplerParams())
    a, b = plain.offdiagonal(100_000, 0, gen)
    assert (a <= b).all()
    assert (b - a).mean().item() == pytest.approx(1 / 3, abs=0.01)  # E|U1 − U2| = 1/3 on the triangle
    curriculum = Uniform(TimeSamplerParams(fm_steps=100, anneal_steps=400))
    assert curriculum.diagonal_only(99) and not curriculum.diagonal_only(100)
    a, b = curriculum.offdiagonal(10_000, 200, gen)  # δ = (200 − 100)/400 = 0.25
    assert (b - a).max().item() <= 0.25 + 1e-6 and (b - a).max().item() > 0.2


def test_ema_tracks_the_average_with_warmup():
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ema = EMA(net, [0.5])
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net, step=100)  # decay min(0.5, 101/110) = 0.5
    assert ema.nets[0.5].weight.item() == pytest.approx(0.5)
    ema.update(net, step=0)  # warm-up: decay min(0.5, 1/10) = 0.1
    assert ema.nets[0.5].weight.item() == pytest.approx(0.1 * 0.5 + 0.9)


def test_registry_suggests_the_closest_name():
    with pytest.raises(UnknownName, match="did you mean 'psd_mid'"):
        METHODS.get("psd_midd")
    assert {"fm", "lsd", "esd", "psd_mid", "psd_unif"} <= set(METHODS.names())


def test_time_samplers_map_their_laws_to_canonical_time():
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    logit = LogitNormal(LogitNormalParams(mean=-0.4, std=1.0)).marginal(n, gen)
    noise_level = torch.logit(1 - logit)  # MeanFlow's t = 1 − τ is logit-normal
    assert noise_level.mean().item() == pytest.approx(-0.4, abs=0.01)
    assert noise_level.std().item() == pytest.approx(1.0, abs=0.01)
    sigma_data = 0.5
    tau = LogNormal(LogNormalParams(sigma_min=1e-9, sigma_max=1e9), sigma_data).marginal(n, gen)
    log_sigma = torch.log(sigma_data * (1 - tau) / tau)  # sCM's σ = exp(N(−1.0, 1.4²)), τ = σ_d/(σ_d + σ)
    assert log_sigma.mean().item() == pytest.approx(-1.0, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(1.4, abs=0.02)
    a, b = LogitNormal(LogitNormalParams()).offdiagonal(1000, 0, gen)
    assert (a <= b).all() and (a < b).any()
