"""The mathematics of paper B's secant losses and of the baselines, pinned on Gaussian data (exact flow map).

Every identity is checked against a control that breaks it, so that no check can pass trivially.
"""

import math

import pytest
import torch

from orch.methods.contracts.conventions import (
    canonical_to_edm,
    canonical_to_trigflow,
    edm_to_canonical,
    edm_velocity,
    meanflow_to_canonical,
    trigflow_scale,
    trigflow_to_canonical,
    trigflow_velocity,
)
from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.flow_map import sample_heun
from orch.methods.contracts.method import L2
from orch.methods.contracts.time_samplers import TimeSamplerParams, Uniform
from orch.methods.losses.consistency import karras_sigmas, scm_term
from orch.methods.losses.meanflow import meanflow_term
from orch.methods.losses.secant import endpoint_estimate_term, interior_estimate_term, secant_jumps
from tests.gaussian import gaussian_2d

D = torch.float64
N_MC = 400_000


def one_point(exact, n: int, a: float, b: float, gen: torch.Generator):
    """n copies of one point x_a on the marginal at a, with the jump (a, b) and interior times r ~ U(a, b)."""
    x = exact.mean * a + exact.sigma(torch.tensor(a, dtype=D)) * torch.randn(2, generator=gen, dtype=D)
    a_t, b_t = torch.full((n,), a, dtype=D), torch.full((n,), b, dtype=D)
    r = a_t + torch.rand(n, generator=gen, dtype=D) * (b_t - a_t)
    return x.expand(n, 2), a_t, b_t, r


def diagonal(net):
    return lambda x, t: net(x, t, t)


def posterior_pair(exact, x_r: torch.Tensor, r: torch.Tensor, gen: torch.Generator):
    """(x0, x1) drawn from their law given I_r = x_r (jointly Gaussian per coordinate)."""
    r_ = r[:, None]
    var_r = exact.sigma(r_) ** 2
    mean1 = exact.mean + r_ * exact.std**2 / var_r * (x_r - r_ * exact.mean)
    var1 = exact.std**2 - (r_ * exact.std**2) ** 2 / var_r
    x1 = mean1 + var1.sqrt() * torch.randn(x_r.shape, generator=gen, dtype=D)
    return (x_r - r_ * x1) / (1 - r_), x1


@pytest.mark.parametrize("a, b", [(0.1, 0.8), (0.0, 1.0), (0.6, 0.7)])
def test_sdei_target_averages_to_the_exact_secant(a, b):
    """EI with the exact map and teacher: target = velocity on the true trajectory at r; its mean over
    r ~ U(a, b) is (X_{a,b}(x_a) − x_a)/(b − a) = v(x_a; a, b)."""
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(0)
    x_a, a_t, b_t, r = one_point(exact, N_MC, a, b, gen)
    net = CountingNet(exact)
    term = interior_estimate_term("sdei", net, diagonal(exact), x_a, a_t, b_t, r)
    secant = exact(x_a[:1], a_t[:1], b_t[:1])[0]
    standard_error = term.target.std(0) / N_MC**0.5
    assert ((term.target.mean(0) - secant).abs() < 5 * standard_error + 1e-12).all()
    assert (term.target.std(0) > 1e-3).all()  # the single-r targets really vary
    torch.testing.assert_close(term.pred, secant.expand_as(term.pred))
    wrong = interior_estimate_term("sdei", net, diagonal(exact), x_a, a_t, b_t, a_t + 0.5 * (r - a_t))
    assert ((wrong.target.mean(0) - secant).abs() > 5 * standard_error).any()  # control: r not uniform on (a, b)


@pytest.mark.parametrize("a, b", [(0.2, 0.9), (0.9, 0.2)])  # EE also trains backward jumps
def test_sdee_estimates_the_true_start_and_averages_to_the_secant(a, b):
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(1)
    x_a, a_t, b_t, r = one_point(exact, N_MC, a, b, gen)
    x_r = exact.exact_jump(x_a, a_t, r)
    term = endpoint_estimate_term("sdee", CountingNet(exact), exact(x_r, r, r), x_r, a_t, b_t, r)
    secant = exact(x_a[:1], a_t[:1], b_t[:1])[0]
    torch.testing.assert_close(term.pred, secant.expand_as(term.pred))  # x̂_a = X_{r,a}(x_r) = x_a
    standard_error = term.target.std(0) / N_MC**0.5
    assert ((term.target.mean(0) - secant).abs() < 5 * standard_error + 1e-12).all()


def stee_targets(exact, x_a, a, b, r, gen):
    x_r = exact.exact_jump(x_a, a, r)
    x0, x1 = posterior_pair(exact, x_r, r, gen)
    torch.testing.assert_close((1 - r[:, None]) * x0 + r[:, None] * x1, x_r)
    return endpoint_estimate_term("stee", CountingNet(exact), x1 - x0, x_r, a, b, r).target


def test_stee_conditional_velocity_target_averages_to_the_secant():
    """STEE's target x1 − x0 at r: averaged over the pairs through x_r it is the velocity there, and over r the
    secant (a nested Monte-Carlo mean, so the tolerance is statistical)."""
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(2)
    x_a, a_t, b_t, r = one_point(exact, N_MC, 0.15, 0.85, gen)
    targets = stee_targets(exact, x_a, a_t, b_t, r, gen)
    secant = exact(x_a[:1], a_t[:1], b_t[:1])[0]
    standard_error = targets.std(0) / N_MC**0.5
    assert ((targets.mean(0) - secant).abs() < 5 * standard_error).all()
    skewed = stee_targets(exact, x_a, a_t, b_t, a_t + (r - a_t) ** 2 / (b_t - a_t), gen)  # control: r not uniform
    assert ((skewed.mean(0) - secant).abs() > 5 * standard_error).any()


def test_secant_intervals_follow_paper_b():
    gen = torch.Generator().manual_seed(3)
    sampler = Uniform(TimeSamplerParams())
    a, b = secant_jumps(sampler, 100_000, 4, True, 0, gen)
    assert ((b - a) >= 0).all() and ((b - a) <= 0.25).all() and (b <= 1).all()
    assert torch.allclose(a * 4, (a * 4).round())  # starts snapped to the 4-grid
    a, b = secant_jumps(sampler, 100_000, 4, False, 0, gen)
    assert (b - a).mean().item() == pytest.approx(0.125, abs=0.002)
    assert not torch.allclose(a * 4, (a * 4).round())


def meanflow_exact(exact):
    """MeanFlow's u(z; t, r) (t = 1 noise, z_r = z_t − (t − r)u) from the canonical map via the boundary."""

    def u(z, t, r):
        a, b = meanflow_to_canonical(t, r)
        return -exact(z, a, b)

    return u


def test_meanflow_identity_holds_for_the_exact_map_in_its_own_convention():
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(4)
    u = meanflow_exact(exact)
    t = torch.rand(4096, generator=gen, dtype=D)
    r = t * torch.rand(4096, generator=gen, dtype=D)
    z = exact.mean * (1 - t[:, None]) + exact.sigma(1 - t[:, None]) * torch.randn(4096, 2, generator=gen, dtype=D)
    v = u(z, t, t)  # instantaneous velocity dz/dt
    u_tr, du_dt = torch.func.jvp(u, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    torch.testing.assert_close(u_tr, v - (t - r)[:, None] * du_dt)  # u = v − (t − r)·du/dt
    assert (u_tr - v).abs().max() > 0.1  # control: the average velocity is not the instantaneous one


def test_meanflow_term_vanishes_with_the_exact_velocity_and_not_otherwise():
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(5)
    u = torch.rand(2, 4096, generator=gen, dtype=D)
    a, b = u.min(0).values, u.max(0).values
    x = exact.mean * a[:, None] + exact.sigma(a[:, None]) * torch.randn(4096, 2, generator=gen, dtype=D)
    term = meanflow_term(CountingNet(exact), x, a, b, exact(x, a, a), L2)
    torch.testing.assert_close(term.pred, term.target)
    wrong = meanflow_term(CountingNet(exact), x, a, b, 1.05 * exact(x, a, a), L2)
    assert (wrong.pred - wrong.target).abs().mean() > 1e-3


def rk4(f, x, s0: float, s1: float, steps: int = 400):
    h = (s1 - s0) / steps
    for k in range(steps):
        s = s0 + k * h
        k1 = f(x, s)
        k2 = f(x + h / 2 * k1, s + h / 2)
        k3 = f(x + h / 2 * k2, s + h / 2)
        k4 = f(x + h * k3, s + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_trigflow_conversion_is_exact():
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(6)
    n = 2048
    x0 = exact.sigma0 * torch.randn(n, 2, generator=gen, dtype=D)
    x1 = exact.mean + exact.std * torch.randn(n, 2, generator=gen, dtype=D)
    t = torch.rand(n, generator=gen, dtype=D) * math.pi / 2
    tau = trigflow_to_canonical(t)
    torch.testing.assert_close(canonical_to_trigflow(tau), t)
    x_t = t.cos()[:, None] * x1 + t.sin()[:, None] * x0
    torch.testing.assert_close(x_t / trigflow_scale(t)[:, None], (1 - tau[:, None]) * x0 + tau[:, None] * x1)
    # the conditional velocity maps exactly: dx_t/dt = cos t·x0 − sin t·x1
    torch.testing.assert_close(trigflow_velocity(x1 - x0, x_t, t), t.cos()[:, None] * x0 - t.sin()[:, None] * x1)

    # and the probability-flow ODE in TrigFlow time transports like the canonical flow map
    def velocity(x, s):
        s = torch.full((n,), s, dtype=D)
        tau_s = trigflow_to_canonical(s)
        return trigflow_velocity(exact(x / trigflow_scale(s)[:, None], tau_s, tau_s), x, s)

    t1, t2 = 1.3, 0.2
    start = torch.randn(n, 2, generator=gen, dtype=D)
    moved = rk4(velocity, start, t1, t2)
    s1, s2 = torch.full((n,), t1, dtype=D), torch.full((n,), t2, dtype=D)
    a, b = trigflow_to_canonical(s1), trigflow_to_canonical(s2)
    expected = trigflow_scale(s2)[:, None] * exact.exact_jump(start / trigflow_scale(s1)[:, None], a, b)
    torch.testing.assert_close(moved, expected, rtol=1e-7, atol=1e-7)


def test_edm_conversion_is_exact():
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(7)
    sigma_data, n = 0.5, 2048
    sigma = torch.exp(torch.randn(n, generator=gen, dtype=D))
    tau = edm_to_canonical(sigma, sigma_data)
    torch.testing.assert_close(canonical_to_edm(tau, sigma_data), sigma)
    noise = torch.randn(n, 2, generator=gen, dtype=D)
    x1 = torch.randn(n, 2, generator=gen, dtype=D)
    x_sigma = x1 + sigma[:, None] * noise
    interpolant = (1 - tau[:, None]) * (sigma_data * noise) + tau[:, None] * x1
    torch.testing.assert_close(x_sigma, interpolant / tau[:, None])

    # EDM's ODE with base std σ_d: simulate it with the Gaussian whose base std is σ_d
    exact.sigma0 = torch.full((2,), sigma_data, dtype=D)

    def velocity(x, s):
        s = torch.full((n,), s, dtype=D)
        tau_s = edm_to_canonical(s, sigma_data)
        return edm_velocity(exact(tau_s[:, None] * x, tau_s, tau_s), x, s, sigma_data)

    sig1, sig2 = 5.0, 0.05
    start = torch.randn(n, 2, generator=gen, dtype=D) * 5
    moved = rk4(velocity, start, sig1, sig2, steps=4000)
    a = edm_to_canonical(torch.full((n,), sig1, dtype=D), sigma_data)
    b = edm_to_canonical(torch.full((n,), sig2, dtype=D), sigma_data)
    expected = exact.exact_jump(a[:, None] * start, a, b) / b[:, None]
    torch.testing.assert_close(moved, expected, rtol=1e-6, atol=1e-6)


class ToData(torch.nn.Module):
    """The exact consistency function's network: v(x; τ, 1) of the exact flow map (b is always 1 here)."""

    def __init__(self, exact):
        super().__init__()
        self.exact = exact

    def forward(self, x, a, b):
        return self.exact(x, a, b)


def test_scm_tangent_vanishes_on_the_exact_consistency_function():
    """With the exact map and the exact teacher velocity, d/dt f = 0 along the ODE, sCM's tangent g is 0 and the
    target equals the prediction; a slightly wrong map gives a non-zero tangent."""
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(8)
    n, sigma_data = 4096, 0.7
    tau = 0.05 + 0.9 * torch.rand(n, generator=gen, dtype=D)
    t = canonical_to_trigflow(tau)
    x0 = exact.sigma0 * torch.randn(n, 2, generator=gen, dtype=D)
    x1 = exact.mean + exact.std * torch.randn(n, 2, generator=gen, dtype=D)
    x_t = t.cos()[:, None] * x1 + t.sin()[:, None] * x0
    dxdt = trigflow_velocity(exact(x_t / trigflow_scale(t)[:, None], tau, tau), x_t, t)
    term = scm_term("scd", CountingNet(exact), x_t, dxdt, tau, 1.0, 0.1, True, sigma_data)
    assert term.measured.abs().max() < 1e-9  # d/dt f⁻ = 0: f is constant along the trajectory
    torch.testing.assert_close(term.pred, term.target)
    wrong = gaussian_2d()
    wrong.std = wrong.std * 1.05
    bad = scm_term("scd", CountingNet(wrong), x_t, dxdt, tau, 1.0, 0.1, True, sigma_data)
    assert bad.measured.abs().mean() > 1e-2 and (bad.pred - bad.target).abs().mean() > 1e-3


def test_heun_uses_exactly_the_nfe_and_is_second_order():
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(9)
    x0 = exact.sigma0 * torch.randn(20_000, 2, generator=gen, dtype=D)
    counted = CountingNet(exact)
    for nfe in (1, 2, 3, 8):
        before = counted.forwards
        sample_heun(counted, x0, nfe)
        assert counted.forwards - before == nfe * len(x0)
    truth = exact.exact_jump(x0, torch.zeros(len(x0), dtype=D), torch.ones(len(x0), dtype=D))
    errors = [(sample_heun(exact, x0, nfe) - truth).abs().mean().item() for nfe in (4, 8, 16)]
    assert 3.5 < errors[0] / errors[1] and 3.5 < errors[1] / errors[2]  # halving h cuts the error by ~4


def test_karras_grid_and_ict_curriculum():
    sigmas = karras_sigmas(11, 0.002, 80.0, 7.0)
    assert sigmas[0].item() == pytest.approx(0.002) and sigmas[-1].item() == pytest.approx(80.0)
    assert (sigmas[1:] > sigmas[:-1]).all()
    from orch.methods.contracts.interpolants import LinearInterpolant
    from orch.methods.contracts.method import Setting
    from orch.methods.losses.consistency import ICTParams, ImprovedConsistencyTraining

    ict = ImprovedConsistencyTraining(
        ICTParams(doubling_steps=100), Setting(LinearInterpolant(torch.ones(2)), None, 1.0)
    )
    assert [ict.grid_points(k) for k in (0, 99, 100, 250, 10**6)] == [11, 11, 21, 41, 1281]


class DropoutOnly(torch.nn.Module):
    """v(x; a, b) = dropout(1): ignores x and the times, so two passes agree iff they drew the same mask."""

    def __init__(self):
        super().__init__()
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x, a, b):
        return self.dropout(torch.ones_like(x))


def test_student_and_estimator_passes_draw_the_same_dropout_masks():
    net = CountingNet(DropoutOnly().train())
    n = 512
    x, a = torch.zeros(n, 8), torch.zeros(n)
    b, r = torch.ones(n), torch.full((n,), 0.5)
    term = interior_estimate_term("sdei", net, lambda x_r, t: x_r, x, a, b, r)
    estimator = term.target / 0.5  # x̂_r = x + (r − a)·v(x; a, r) and the "velocity" here returns x̂_r itself
    torch.testing.assert_close(term.pred, estimator)
    term = endpoint_estimate_term("sdee", net, torch.zeros(n, 8), x, a, b, r)
    assert not torch.equal(term.pred, DropoutOnly().train()(x, a, b))  # control: fresh masks differ
