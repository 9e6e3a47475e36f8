"""The mathematics, pinned on Gaussian data where the exact flow map is known in closed form."""

import pytest
import torch

from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.flow_map import jump, sample_euler, sample_flow_map
from orch.methods.contracts.interpolants import LinearInterpolant
from orch.methods.losses.self_distillation import esd_term, lsd_term, psd_term
from tests.gaussian import gaussian_2d

N = 4096


def random_jumps(n: int, gen: torch.Generator):
    u = torch.rand(2, n, generator=gen, dtype=torch.float64)
    return u.min(0).values, u.max(0).values


def marginal_samples(exact, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    x0 = torch.randn(len(t), 2, generator=gen, dtype=torch.float64) * exact.sigma0
    x1 = exact.mean + exact.std * torch.randn(len(t), 2, generator=gen, dtype=torch.float64)
    return LinearInterpolant(exact.sigma0).interpolate(x0, x1, t)


def test_parameterised_jump_is_the_exact_affine_flow_map():
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(0)
    a, b = random_jumps(N, gen)
    x = torch.randn(N, 2, generator=gen, dtype=torch.float64) * 3
    torch.testing.assert_close(jump(exact, x, a, b), exact.exact_jump(x, a, b), rtol=1e-10, atol=1e-10)
    same = torch.zeros(N, dtype=torch.float64) + 0.3
    torch.testing.assert_close(jump(exact, x, same, same), x)  # X_{a,a} = id


def test_flow_map_pushes_marginals_forward():
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(1)
    a = torch.full((200_000,), 0.2, dtype=torch.float64)
    b = torch.full_like(a, 0.9)
    moved = jump(exact, marginal_samples(exact, a, gen), a, b)
    target = marginal_samples(exact, b, gen)
    torch.testing.assert_close(moved.mean(0), target.mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(moved.std(0), target.std(0), atol=0.02, rtol=0)


@pytest.mark.parametrize(
    "name, stopgrad",
    [
        ("lsd", "convex"),
        ("lsd", "none"),
        ("esd", "full"),
        ("esd", "convex"),
        ("esd", "none"),
        ("psd_mid", "convex"),
        ("psd_mid", "none"),
        ("psd_unif", "convex"),
        ("psd_unif", "none"),
    ],
)
def test_self_distillation_residuals_vanish_on_the_exact_flow_map(name, stopgrad):
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(2)
    net = CountingNet(exact)
    a, b = random_jumps(N, gen)
    x = marginal_samples(exact, a, gen)
    if name == "lsd":
        term = lsd_term(net, x, a, b, stopgrad)
    elif name == "esd":
        term = esd_term(net, x, a, b, stopgrad)
    else:
        gamma = torch.full_like(a, 0.5) if name == "psd_mid" else torch.rand(N, generator=gen, dtype=torch.float64)
        term = psd_term(net, x, a, b, gamma, stopgrad)
    residual = (term.pred - term.target).abs().max().item()
    assert residual < 1e-9, f"{name}/{stopgrad} residual {residual}"
    assert term.target.abs().max() > 0.1  # the identity is not trivially 0 = 0


def test_residuals_detect_a_wrong_flow_map():
    """Control: perturb the exact map slightly and every residual becomes clearly non-zero."""
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(3)
    wrong = gaussian_2d()
    wrong.std = wrong.std * 1.1
    wrong.sigma = exact.sigma  # inconsistent slope: no longer a flow map of any interpolant
    net = CountingNet(wrong)
    a, b = random_jumps(N, gen)
    x = marginal_samples(exact, a, gen)
    for term in (
        lsd_term(net, x, a, b, "convex"),
        esd_term(net, x, a, b, "full"),
        psd_term(net, x, a, b, torch.full_like(a, 0.5), "convex"),
    ):
        assert (term.pred - term.target).abs().mean() > 1e-3, term.name


def conditional_mean_gap(exact, velocity_net, t_value: float, n: int = 1_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """E[(x1 − x0 − v(I_t; t, t))·g(I_t)] for g ∈ {1, I_t − m_t}, and its standard error. For Gaussians the
    conditional mean is affine in I_t, so both vanish iff v(·; t, t) = E[x1 − x0 | I_t]."""
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(n, 2, generator=gen, dtype=torch.float64) * exact.sigma0
    x1 = exact.mean + exact.std * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    t = torch.full((n,), t_value, dtype=torch.float64)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * x1
    r = (x1 - x0) - velocity_net(x_t, t, t)
    moments = torch.stack([r, r * (x_t - x_t.mean(0))])
    return moments.mean(1), moments.std(1) / n**0.5


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_fm_target_conditional_mean_is_the_diagonal_velocity(t):
    exact = gaussian_2d()
    gap, err = conditional_mean_gap(exact, exact, t)
    assert (gap.abs() < 5 * err).all(), (gap, err)
    wrong = gaussian_2d()
    wrong.mean = wrong.mean + 0.05  # control: a slightly wrong velocity fails the same check
    gap, err = conditional_mean_gap(exact, wrong, t)
    assert (gap.abs() > 5 * err).any()


def test_flow_map_sampler_is_exact_in_one_step_and_euler_converges():
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(5)
    x0 = torch.randn(200_000, 2, generator=gen, dtype=torch.float64) * exact.sigma0
    for steps in (1, 4):
        x1 = sample_flow_map(exact, x0, steps)
        torch.testing.assert_close(x1.mean(0), exact.mean, atol=0.02, rtol=0)
        torch.testing.assert_close(x1.std(0), exact.std, atol=0.02, rtol=0)
    truth = sample_flow_map(exact, x0, 1)
    errors = [(sample_euler(exact, x0, n) - truth).abs().mean().item() for n in (1, 4, 16)]
    # first-order: quadrupling the steps cuts the error by about four
    assert errors[0] > errors[1] > errors[2]
    assert 3 < errors[1] / errors[2] < 5
