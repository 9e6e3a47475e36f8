"""The 2025–26 teacher-free methods (iMF, α-Flow, TVM, TiM, IMM, SplitMeanFlow) pinned on exact Gaussian flows.

Each identity comes with a control that breaks it by a wide margin, so that no check can pass trivially.
"""

import math

import pytest
import torch
import yaml

from orch.cli import main
from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.guidance import ClassConditioning, Condition
from orch.methods.contracts.interpolants import LinearInterpolant
from orch.methods.contracts.method import L2, Setting
from orch.methods.losses.alpha_flow import AlphaSchedule, alpha_target
from orch.methods.losses.imf import IMF, IMFParams, power_law
from orch.methods.losses.imm import group_mmd, imm_times, kernel_scale, laplace_kernel, noise_to_signal
from orch.methods.losses.meanflow import meanflow_term
from orch.methods.losses.self_distillation import lsd_term, own_diagonal, psd_term
from orch.methods.losses.tim import central_difference, interval_weight
from orch.methods.losses.tvm import TVM, TVMParams, gap_times
from orch.methods.networks.dit import DiTParams, build_dit
from orch.methods.networks.mlp import FlowMapMLP, MLPParams, build_mlp
from orch.methods.networks.unet import UNetParams, build_unet
from tests.gaussian import ExactGaussianFlowMap, ExactMixtureVelocity, gaussian_2d
from tests.test_methods_math import posterior_pair

D = torch.float64


def marginal_points(exact, n: int, gen: torch.Generator, a=None, b=None):
    """n points x ~ I_a with jumps 0 ≤ a < b ≤ 1 (random unless given). Shapes (n, 2), (n,), (n,)."""
    u = torch.rand(2, n, generator=gen, dtype=D)
    a = u.min(0).values if a is None else torch.full((n,), a, dtype=D)
    b = u.max(0).values if b is None else torch.full((n,), b, dtype=D)
    x = exact.mean * a[:, None] + exact.sigma(a[:, None]) * torch.randn(n, 2, generator=gen, dtype=D)
    return x, a, b


def test_imf_compound_velocity_with_the_models_own_tangent_is_the_velocity_pointwise():
    """iMF: V = v − (b − a)·D^ĝ_a v with the exact map and its own diagonal ĝ = b_a as tangent is b_a(x) at every
    point; with the conditional velocity as tangent it is right only in conditional mean."""
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(0)
    x, a, b = marginal_points(exact, 4096, gen)
    velocity = exact(x, a, a)
    term = meanflow_term(CountingNet(exact), x, a, b, velocity, L2, tangent=velocity)
    compound = term.pred - (term.target - velocity)  # V = v − (b − a)·D
    torch.testing.assert_close(compound, velocity)
    assert (term.pred - velocity).abs().max() > 0.1  # the average velocity itself is not the instantaneous one
    # control: the conditional velocity as tangent — wrong at each point, right on average over the pairs
    x1, a1, b1 = marginal_points(exact, 1, gen, a=0.3, b=0.8)
    n = 200_000
    x0s, x1s = posterior_pair(exact, x1.expand(n, 2), a1.expand(n), gen)
    conditional = x1s - x0s
    points = x1.expand(n, 2).clone(), a1.expand(n).clone(), b1.expand(n).clone()
    term = meanflow_term(CountingNet(exact), *points, conditional, L2)
    compound = term.pred - (term.target - conditional)
    assert (compound - exact(x1, a1, a1)).abs().max() > 0.1
    standard_error = compound.std(0) / n**0.5
    assert ((compound.mean(0) - exact(x1, a1, a1)[0]).abs() < 5 * standard_error).all()


class GuidedMixture(torch.nn.Module):
    """A conditional network whose output at guidance input ω̃ is the guided velocity v_∅ + ω(v_y − v_∅) of a
    two-class mixture (ω = lo + ω̃·(hi − lo)); the null label gives v_∅."""

    def __init__(self, exact: ExactMixtureVelocity, cfg_range):
        super().__init__()
        self.exact, self.cfg_range = exact, cfg_range

    def forward(self, x, a, b, labels=None, omega=None):
        lo, hi = self.cfg_range
        v_null, v_cond = self.exact(x, a, b), self.exact(x, a, b, labels)
        return v_null + (lo + omega * (hi - lo))[:, None] * (v_cond - v_null)


def test_imf_guided_target_is_the_guided_velocity_in_expectation():
    """iMF's v_g = İ + (1 − 1/ω)(ĝ_c − ĝ_u) with an exact ω-conditioned network: v_g − İ = (ω − 1)(v_c − v_u),
    so E[v_g | x, y] = v^ω; dropped labels keep İ. Control: (1 − ω) in place of (1 − 1/ω)."""
    mixture = ExactMixtureVelocity(torch.tensor([[2.0, 0.0], [-2.0, 1.0]]), 0.5, torch.ones(2))
    cfg_range, n = (1.0, 8.0), 4096
    method = IMF(
        IMFParams(online_cfg=list(cfg_range)), Setting(LinearInterpolant(torch.ones(2)), None, 1.0, num_classes=2)
    )
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (n,), generator=gen)
    net = CountingNet(GuidedMixture(mixture, cfg_range), condition=Condition(labels=labels), takes_omega=True)
    x, a = torch.randn(n, 2, generator=gen, dtype=D), torch.rand(n, generator=gen, dtype=D)
    velocity = torch.randn(n, 2, generator=gen, dtype=D)  # any İ: the identity is algebraic in it
    v_g, tangent = method.embedded_target(net, x, a, a, velocity, gen)
    dropped = net.condition.labels == 2
    omega = 1 + 7 * net.condition.omega  # the ω each row was given (normalised on [1, 8])
    assert 0.03 < dropped.double().mean() < 0.2 and omega.min() >= 1 and omega.max() <= 8
    v_cond, v_null = mixture(x, a, a, labels), mixture(x, a, a)
    expected = velocity + (omega - 1)[:, None] * (v_cond - v_null)
    torch.testing.assert_close(v_g[~dropped], expected[~dropped], rtol=1e-5, atol=1e-6)  # ω drawn in fp32
    torch.testing.assert_close(v_g[dropped], velocity[dropped])
    guided = v_null + omega[:, None] * (v_cond - v_null)
    torch.testing.assert_close(tangent[~dropped], guided[~dropped], rtol=1e-5, atol=1e-6)
    wrong = velocity + (1 - omega)[:, None] * (tangent - v_null)
    assert (wrong - expected)[~dropped].abs().max() > 1.0
    draws = power_law(torch.rand(200_000, generator=gen, dtype=D), 1.0, 8.0, 1.0)
    assert draws.log().mean().item() == pytest.approx(math.log(8) / 2, abs=0.01)  # log-uniform on [1, 8]


class IntervalMixture(GuidedMixture):
    """GuidedMixture whose output moves by 10·(1 − width) at a guidance interval narrower than [0, 1]: an estimate
    of ĝ taken at the drawn interval instead of the whole one shows."""

    def forward(self, x, a, b, labels=None, omega=None, interval=None):
        width = interval[:, 1] - interval[:, 0]
        return super().forward(x, a, b, labels, omega) + 10 * (1 - width)[:, None]


def test_imf_with_the_guidance_interval_as_input_guides_only_inside_it():
    """online_interval: each off-diagonal row draws [τ_lo, τ_hi] (τ_lo ≤ ½ ≤ τ_hi), diagonal rows get [0, 1]; the
    network sees the drawn ω everywhere, the target is guided (ω) inside the interval and İ outside, ĝ is taken
    over the whole interval. Control: guiding outside the interval too."""
    mixture = ExactMixtureVelocity(torch.tensor([[2.0, 0.0], [-2.0, 1.0]]), 0.5, torch.ones(2))
    cfg_range, n = (1.0, 8.0), 4096
    params = IMFParams(online_cfg=list(cfg_range), online_interval=True, label_dropout=0.0)
    method = IMF(params, Setting(LinearInterpolant(torch.ones(2)), None, 1.0, num_classes=2))
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 2, (n,), generator=gen)
    net = CountingNet(IntervalMixture(mixture, cfg_range), condition=Condition(labels=labels), takes_omega=True)
    x, a = torch.randn(n, 2, generator=gen, dtype=D), torch.rand(n, generator=gen, dtype=D)
    diagonal = torch.rand(n, generator=gen) < 0.5
    b = torch.where(diagonal, a, a + (1 - a) * torch.rand(n, generator=gen, dtype=D))
    velocity = torch.randn(n, 2, generator=gen, dtype=D)
    v_g, _ = method.embedded_target(net, x, a, b, velocity, gen)
    interval, omega = net.condition.interval, 1 + 7 * net.condition.omega
    assert (interval[diagonal] == torch.tensor([0.0, 1.0])).all()
    lo, hi = interval[~diagonal].unbind(1)
    assert lo.max() <= 0.5 <= hi.min() and lo.min() < 0.05 and hi.max() > 0.95
    inside = (a >= interval[:, 0]) & (a <= interval[:, 1])
    assert 0.2 < inside[~diagonal].double().mean() < 0.9 and inside[diagonal].all()
    assert (omega[~inside] - 1).abs().max() > 3  # the network's input is the drawn ω, also outside
    v_cond, v_null = mixture(x, a, a, labels), mixture(x, a, a)
    guided = velocity + (omega - 1)[:, None] * (v_cond - v_null)
    torch.testing.assert_close(v_g[inside], guided[inside], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_g[~inside], velocity[~inside])
    assert (guided - v_g)[~inside].abs().max() > 1.0  # control: guidance outside the interval


@pytest.mark.parametrize("network", ["mlp", "unet", "dit"])
def test_networks_embed_the_guidance_interval_like_the_guidance_scale(network):
    """The guidance interval is an input of MLP, UNet and DiT: the output moves with it, a missing one is a clear
    error, and a network built without it refuses one."""
    conditioning = ClassConditioning(3, omega=True, interval=True)
    torch.manual_seed(0)
    if network == "mlp":
        net, x = build_mlp(MLPParams(width=32, depth=2), (2,), torch.ones(2), conditioning), torch.randn(4, 2)
    elif network == "unet":
        params = UNetParams(channels=8, channel_mult=[1], attn_resolutions=[])
        net, x = build_unet(params, (1, 8, 8), torch.ones(1), conditioning), torch.randn(4, 1, 8, 8)
    else:
        net = build_dit(DiTParams(depth=1, hidden=32, heads=2), (1, 8, 8), torch.ones(1), conditioning)
        x = torch.randn(4, 1, 8, 8)
    for name, p in net.named_parameters():  # weights that make every path show (UNet and DiT zero-initialise some)
        if "interval" in name or not p.any():
            torch.nn.init.normal_(p, std=0.2)
    a, b, labels, omega = torch.full((4,), 0.2), torch.full((4,), 0.7), torch.tensor([0, 1, 2, 3]), torch.zeros(4)
    whole, narrow = torch.tensor([[0.0, 1.0]]).expand(4, 2), torch.tensor([[0.3, 0.6]]).expand(4, 2)
    with torch.no_grad():
        moved = net(x, a, b, labels, omega, narrow) - net(x, a, b, labels, omega, whole)
    assert moved.abs().amax(dim=tuple(range(1, x.dim()))).min() > 1e-3  # every sample's output moves
    assert any("interval" in name for name, _ in net.named_parameters())
    with pytest.raises(ValueError, match="guidance input interval"):
        net(x, a, b, labels, omega)
    plain = build_mlp(MLPParams(width=32, depth=2), (2,), torch.ones(2))
    with pytest.raises(ValueError, match="without class conditioning"):
        plain(torch.randn(4, 2), a, b, interval=whole)


def test_alpha_flow_target_is_exact_with_the_models_velocity_and_biased_by_alpha_squared_with_the_instantaneous():
    """α-Flow: with the shift ṽ = v(x; a, c) the α target is the flow map at every α (the Shortcut corner); with
    the instantaneous velocity (the conditional one's expectation) it is biased by O(α²) — expected and kept."""
    exact = ExactGaussianFlowMap(torch.ones(2, dtype=D), torch.full((2,), 1.5, dtype=D), torch.full((2,), 0.5, dtype=D))
    gen = torch.Generator().manual_seed(2)
    x, a, b = marginal_points(exact, 4096, gen)
    v = exact(x, a, b)
    net = CountingNet(exact)
    for alpha in (1.0, 0.5, 0.25, 0.01):
        c = a + alpha * (b - a)
        torch.testing.assert_close(alpha_target(net, x, a, b, exact(x, a, c), alpha, None), v)
        wrong_c = a + (1 - alpha) * (b - a)  # control: the intermediate time at the wrong end
        if alpha != 0.5:
            assert (alpha_target(net, x, a, b, exact(x, a, wrong_c), alpha, None) - v).abs().max() > 1e-2
    errors = {alpha: (alpha_target(net, x, a, b, exact(x, a, a), alpha, None) - v).abs().max().item()
              for alpha in (1.0, 0.1, 0.01)}  # fmt: skip
    assert errors[1.0] > 1.0 and 50 < errors[0.1] / errors[0.01] < 200


def test_alpha_schedule_runs_from_one_to_zero_and_clamps():
    schedule = AlphaSchedule(start=0.2, end=0.6)
    assert schedule(0, 1000) == schedule(200, 1000) == 1.0 and schedule(600, 1000) == schedule(999, 1000) == 0.0
    assert schedule(400, 1000) == pytest.approx(0.5)
    assert schedule(201, 1000) == 1.0  # 1 − σ(−12.4) > 1 − η: clamped to 1
    assert 0 < schedule(450, 1000) < 0.5 < schedule(350, 1000) < 1
    assert AlphaSchedule(kind="linear", start=0.0, end=1.0)(250, 1000) == pytest.approx(0.75)
    assert AlphaSchedule(kind="constant", value=0.004)(10, 100) == 0.0  # below η: the MeanFlow branch


def test_tvm_terminal_velocity_of_the_exact_map_is_the_velocity_where_it_lands():
    """TVM: ∂_b X*_{a,b}(x) = b_b(X*_{a,b}(x)) pointwise (the JVP in b through the exact map); control: the
    derivative in a."""
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(3)
    x, a, b = marginal_points(exact, 4096, gen)
    term = lsd_term(CountingNet(exact), x, a, b, "convex", own_diagonal(CountingNet(exact)))
    torch.testing.assert_close(term.pred, term.target)
    v, dv_da = torch.func.jvp(exact, (x, a, b), (torch.zeros_like(x), torch.ones_like(a), torch.zeros_like(b)))
    assert (v + (b - a)[:, None] * dv_da - term.target).abs().max() > 0.5


def test_tvm_guided_flow_matching_target_and_gap_times():
    """TVM's flow-matching target w·İ + (1 − w)·v_EMA(∅) averages to v^w = w·v_y + (1 − w)·v_∅ (İ averages to
    v_y); dropped labels train at w = 1 and every term is weighted 1/w². The gap sampler's jumps end above their
    length and start at b − ℓ."""
    mixture = ExactMixtureVelocity(torch.tensor([[2.0, 0.0], [-2.0, 1.0]]), 0.5, torch.ones(2))
    gen, n = torch.Generator().manual_seed(4), 4096
    labels = torch.randint(0, 3, (n,), generator=gen)
    setting = Setting(LinearInterpolant(torch.ones(2)), None, 1.0, num_classes=2)
    setting.ema_copy = lambda decay: CountingNet(mixture, condition=Condition(labels=labels))
    method = TVM(TVMParams(guidance=2.0), setting)
    x, tau = torch.randn(n, 2, generator=gen, dtype=D), torch.rand(n, generator=gen, dtype=D)
    v_cond, v_null = mixture(x, tau, tau, labels), mixture(x, tau, tau)
    target, w = method.flow_matching_target(x, tau, v_cond)
    dropped = labels == 2
    assert set(w[dropped].tolist()) == {1.0} and set(w[~dropped].tolist()) == {2.0}
    torch.testing.assert_close(target, w[:, None] * v_cond + (1 - w)[:, None] * v_null)
    torch.testing.assert_close(target[dropped], v_cond[dropped])
    assert (target - v_cond)[~dropped].abs().max() > 1.0  # control: guidance really changes the target
    a, b = gap_times(200_000, torch.Generator().manual_seed(5), (-0.8, 1.0), (0.4, 1.0))
    length = b - a
    assert (a >= 0).all() and (b <= 1).all() and (length > 0).all()
    assert torch.logit(length).mean().item() == pytest.approx(-0.8, abs=0.01)
    _, b = gap_times(200_000, torch.Generator().manual_seed(5), (0.5, 1e-9), (0.4, 1.0))  # a fixed length σ(0.5)
    rejected = torch.sigmoid(0.4 + torch.randn(2_000_000, generator=gen))  # b ~ LN(0.4, 1) given b ≥ ℓ, by rejection
    kept = rejected[rejected >= math.exp(0.5) / (1 + math.exp(0.5))]
    assert b.mean().item() == pytest.approx(kept.mean().item(), abs=0.002)
    assert b.std().item() == pytest.approx(kept.std().item(), abs=0.002)


def test_tim_central_difference_is_second_order_and_its_interval_weight():
    """TiM's DDE along the conditional path converges to the JVP as ε² (ratio 4 per halving); a one-sided
    difference only as ε (ratio 2). The interval weight is 1 on the diagonal and falls with the jump."""
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(6)
    x, a, b = marginal_points(exact, 512, gen)
    a = a * 0.8 + 0.1  # keep a ± ε inside [0, b]
    b = torch.maximum(b, a + 0.05)
    velocity = torch.randn(512, 2, generator=gen, dtype=D)
    _, exact_d = torch.func.jvp(exact, (x, a, b), (velocity, torch.ones_like(a), torch.zeros_like(b)))
    net = CountingNet(exact)

    def error(eps, one_sided=False):
        if one_sided:
            d = (exact(x + eps * velocity, a + eps, b) - exact(x, a, b)) / eps
        else:
            d = central_difference(net, x, a, b, velocity, eps, lambda: None)
        return (d - exact_d).abs().max().item()

    central = [error(e) for e in (0.02, 0.01, 0.005)]
    assert 3.5 < central[0] / central[1] < 4.5 and 3.5 < central[1] / central[2] < 4.5
    forward = [error(e, True) for e in (0.02, 0.01)]
    assert 1.8 < forward[0] / forward[1] < 2.2
    t = torch.tensor([0.3, 0.3, 0.3], dtype=D)
    w = interval_weight(t, torch.tensor([0.3, 0.5, 0.9], dtype=D), 1.0)
    assert w[0].item() == pytest.approx(1.0) and w[0] > w[1] > w[2]


def test_imm_mmd_vanishes_in_expectation_at_the_exact_map_and_decomposes():
    """IMM: with the exact map, particles jumped from a and from ρ have the same law, so the unbiased MMD² has
    mean 0 (within 3 standard errors) and a map off by 5% in scale is detected; the V-statistic is
    ((M − 1)/M)·U + (2/M²)·Σ_i(1 − k(y_i, ŷ_i)) to float precision. Control: ŷ from independent pairs leaves U at 0
    and changes V."""
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(7)
    groups, m = 20_000, 4
    a, rho, b = (t.repeat_interleave(m) for t in imm_times(groups, gen, 0.006, 0.994, 12))
    x0 = exact.sigma0 * torch.randn(groups * m, 2, generator=gen, dtype=D)
    x1 = exact.mean + exact.std * torch.randn(groups * m, 2, generator=gen, dtype=D)
    interpolate = lambda t: (1 - t[:, None]) * x0 + t[:, None] * x1  # noqa: E731
    y = exact.exact_jump(interpolate(a), a, b).reshape(groups, m, 2)
    y_hat = exact.exact_jump(interpolate(rho), rho, b).reshape(groups, m, 2)
    scale = 1 / (b - a)[::m].double()  # IMM's w̃ = 1/((b − a)σ_d), σ_d = 1
    EPS = 1e-14  # k(u, u) = exp(−w̃ε/D) = 1 to float precision, as the decomposition assumes
    u = group_mmd(y, y_hat, scale, EPS, "u")
    assert abs(u.mean().item()) < 3 * u.std().item() / groups**0.5
    centre = b[:, None] * exact.mean
    off = (centre + 1.05 * (exact.exact_jump(interpolate(a), a, b) - centre)).reshape(groups, m, 2)
    u_off = group_mmd(off, y_hat, scale, EPS, "u")
    assert u_off.mean().item() > 10 * u.std().item() / groups**0.5
    v = group_mmd(y, y_hat, scale, EPS, "v")
    pairing = (1 - torch.diagonal(laplace_kernel(y, y_hat, scale, EPS), dim1=1, dim2=2)).sum(1)
    torch.testing.assert_close(v, (m - 1) / m * u + 2 / m**2 * pairing)
    fresh = (
        exact.sigma0 * torch.randn(groups * m, 2, generator=gen, dtype=D),
        exact.mean + exact.std * torch.randn(groups * m, 2, generator=gen, dtype=D),
    )  # independent pairs at the same times
    shuffled = exact.exact_jump((1 - rho[:, None]) * fresh[0] + rho[:, None] * fresh[1], rho, b).reshape(groups, m, 2)
    u_shuffled = group_mmd(y, shuffled, scale, EPS, "u")
    assert abs(u_shuffled.mean().item()) < 3 * u_shuffled.std().item() / groups**0.5
    assert group_mmd(y, shuffled, scale, EPS, "v").mean() > 1.5 * v.mean()


def test_imm_zero_length_jump_keeps_a_finite_gradient():
    """A float32 draw can give b = a: the particles then coincide with their targets and the gradient must stay
    finite (an unfloored w̃ = 1/(b − a) made it NaN in training)."""
    a = torch.tensor([0.3, 0.5])
    y = torch.randn(2, 4, 2, requires_grad=True)
    mmd = group_mmd(y, y.detach().clone(), kernel_scale(a, a.clone(), 1.0), 1e-8, "v")
    mmd.sum().backward()
    assert torch.isfinite(y.grad).all() and torch.isfinite(kernel_scale(a, a, 1.0)).all()
    z = torch.randn(2, 4, 2, requires_grad=True)  # control: the unfloored scale
    group_mmd(z, z.detach().clone(), 1 / (a - a), 1e-8, "v").sum().backward()
    assert not torch.isfinite(z.grad).all()


def test_imm_times_step_one_noise_to_signal_stride():
    a, rho, b = imm_times(100_000, torch.Generator().manual_seed(8), 0.006, 0.994, 12)
    t, r, s = 1 - a, 1 - rho, 1 - b
    assert (s <= r + 1e-12).all() and (r < t).all()
    stride = (noise_to_signal(0.994) - noise_to_signal(0.006)) / 2**12
    free = r > s + 1e-9  # not clamped to s
    assert free.any() and (~free).any()
    torch.testing.assert_close(noise_to_signal(r[free]), noise_to_signal(t[free]) - stride, rtol=1e-4, atol=1e-4)


def test_split_meanflow_target_is_psd_with_gamma_one_minus_lambda():
    """SplitMeanFlow's target λ·v(x; a, c) + (1 − λ)·v(X_{a,c}(x); c, b), c = a + λ(b − a), equals PSD's with
    γ = 1 − λ for any network; the exact map satisfies it pointwise. Control: the weights swapped."""
    gen = torch.Generator().manual_seed(9)
    torch.manual_seed(9)
    net = CountingNet(FlowMapMLP(2, 32, 3, torch.ones(2)).double())
    x, a, b = marginal_points(gaussian_2d(), 1024, gen)
    lam = torch.rand(1024, generator=gen, dtype=D)
    c = a + lam * (b - a)
    with torch.no_grad():
        v_ac = net(x, a, c)
        split = lam[:, None] * v_ac + (1 - lam)[:, None] * net(x + (c - a)[:, None] * v_ac, c, b)
    torch.testing.assert_close(psd_term(net, x, a, b, 1 - lam, "convex").target, split)
    exact = CountingNet(gaussian_2d())
    term = psd_term(exact, x, a, b, 1 - lam, "convex")
    torch.testing.assert_close(term.pred, term.target)
    v_ac = exact(x, a, c)
    swapped = (1 - lam)[:, None] * v_ac + lam[:, None] * exact(x + (c - a)[:, None] * v_ac, c, b)
    assert (swapped - term.pred).abs().max() > 0.5


@pytest.mark.parametrize(
    "method, dataset, message",
    [
        ({"name": "alpha_flow", "schedule": {"start": 0.8, "end": 0.2}}, "checkerboard", "must be before end"),
        (
            {"name": "alpha_flow", "schedule": {"kind": "constant", "value": 1.5}},
            "checkerboard",
            "less than or equal to 1",
        ),
        ({"name": "imm", "group_size": 3}, "checkerboard", "3 does not divide the micro-batch of 512 rows"),
        ({"name": "imf", "online_cfg": [1.0, 8.0], "cfg_interval": [0.7, 0.2]}, "gmm", "not an interval"),
        ({"name": "imf", "online_cfg": [1.0, 8.0]}, "gmm_unconditional", "set dataset.conditional"),
        ({"name": "imf", "online_interval": True}, "gmm", "online_interval is a guidance input: it needs online_cfg"),
        (
            {"name": "imf", "online_cfg": [1.0, 8.0], "online_interval": True, "cfg_interval": [0.2, 0.7]},
            "gmm",
            "cfg_interval (a fixed one) must be null",
        ),
        ({"name": "imf", "online_cfg": [1.0, 8.0], "eval": [0.2, 0.7]}, "gmm", "needs method.online_interval"),
        ({"name": "imf", "online_cfg": [1.0, 8.0], "online_interval": True, "eval": [0.7, 0.2]}, "gmm", "low above"),
    ],
)
def test_bad_options_of_the_new_methods_exit_2_at_validation(tmp_path, capsys, method, dataset, message):
    method = dict(method)
    study = {
        "name": "bad",
        "base": {"dataset": {"name": dataset.split("_")[0]}, "train": {"batch_size": 512}},
        "grid": {"method": [method]},
    }
    if "eval" in method:  # an eval.guidance_interval next to the method
        study["base"]["eval"] = {"guidance_interval": method.pop("eval"), "guidance": [2.0]}
    if dataset == "gmm":
        study["base"]["dataset"]["conditional"] = True
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(SystemExit) as exited:
        main(["validate", str(path)])
    assert exited.value.code == 2
    output = capsys.readouterr()
    assert message in output.out + output.err and "Traceback" not in output.err, output
