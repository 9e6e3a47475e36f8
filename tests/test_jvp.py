"""JVP back-ends (train.jvp, model.attention): the forward-mode rule of attention equals the explicit softmax's,
finite differences converge to the exact JVP at their order with the same random draws, bad combinations are
refused, and training with finite differences follows training with exact JVPs."""

import math

import pytest
import torch

from orch.cli.app import main
from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.jvp import JvpConfig
from orch.methods.contracts.metric_keys import JVP_UNRESOLVED
from orch.methods.networks.dit import DiTParams, build_dit
from orch.methods.networks.unet import UNetParams, build_unet
from orch.methods.runtime.attention import QKNorm, attention, softmax_tangent, tangent_attention
from tests.trainers import trainer_for

F64 = torch.float64


def networks(attention_mode: str, dropout: float = 0.0, qk_norm: bool = False) -> dict:
    """A tiny DiT and a tiny UNet with attention, fp64, with every layer's weights non-zero (the zero-initialised
    output layers would hide the rest)."""
    torch.manual_seed(0)
    nets = {
        "dit": build_dit(
            DiTParams(depth=2, hidden=32, heads=2, attention=attention_mode, qk_norm=qk_norm), (2, 8, 8), torch.ones(1)
        ),
        "unet": build_unet(
            UNetParams(
                channels=8,
                channel_mult=[1, 2],
                attn_resolutions=[4],
                dropout=dropout,
                attention=attention_mode,
                qk_norm=qk_norm,
            ),
            (2, 8, 8),
            torch.ones(1),
        ),
    }
    for net in nets.values():
        net.double()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return nets


def tangents_of(net, x, a, b) -> dict:
    """The tangents orch's JVP methods use: MeanFlow (v, 1, 0), LSD (0, 0, 1), ESD (b̂, 1, 0) and (b̂, 0, 0)."""
    zeros, ones = torch.zeros_like(a), torch.ones_like(a)
    with torch.no_grad():
        v, b_hat = net(x, a, b), net(x, a, a)
    return {
        "meanflow": (v, ones, zeros),
        "lsd": (torch.zeros_like(x), zeros, ones),
        "esd": (torch.zeros_like(x), ones, zeros),
        "esd_spatial": (b_hat, zeros, zeros),
    }


def inputs(n: int = 6):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, 8, 8, generator=gen, dtype=F64)
    a = 0.1 + 0.4 * torch.rand(n, generator=gen, dtype=F64)
    return x, a, a + 0.3


def relative(u, v) -> float:
    return ((u - v).norm() / v.norm()).item()


def test_the_forward_mode_rule_of_attention_and_its_gradient_equal_the_explicit_softmax():
    gen = torch.Generator().manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(2, 4, 64, 32, generator=gen, dtype=F64, requires_grad=True) for _ in range(6))

    def jvp_and_grads(mode):
        with tangent_attention():
            out, tangent = torch.func.jvp(lambda q, k, v: attention(q, k, v, mode), (q, k, v), (dq, dk, dv))
        loss = (tangent**2).sum() + (out**3).sum()  # back-propagates through the tangent, as LSD's loss does
        return [out, tangent, *torch.autograd.grad(loss, (q, k, v, dq, dk))]

    for ours, reference in zip(jvp_and_grads("sdpa"), jvp_and_grads("math")):
        assert relative(ours, reference) < 1e-12
    # the rule without softmax's Σ_k w ṡ correction is wrong by far more than the tolerance
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1)
    ds = (dq @ k.transpose(-1, -2) + q @ dk.transpose(-1, -2)) / math.sqrt(32)
    assert relative(w * ds, softmax_tangent(w, ds)) > 1e-2


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_the_sdpa_rule_equals_math_attention_through_a_network(kind, qk_norm):
    x, a, b = inputs()
    (math_net, sdpa_net) = (networks(mode, qk_norm=qk_norm)[kind] for mode in ("math", "sdpa"))
    for name, tangent in tangents_of(math_net, x, a, b).items():
        v_math, dv_math = CountingNet(math_net).jvp((x, a, b), tangent)
        v_sdpa, dv_sdpa = CountingNet(sdpa_net).jvp((x, a, b), tangent)
        assert relative(v_sdpa, v_math) < 1e-12 and relative(dv_sdpa, dv_math) < 1e-12, name


def test_qk_norm_bounds_the_attention_logits_whatever_the_scale_of_the_tokens():
    """With unit RMS per head, |q·k|/√d ≤ √d (Cauchy–Schwarz) however large the queries and keys grow."""
    norm = QKNorm(16)
    gen = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 1e3):  # (far below 1e-3 the normalisation's ε = 1e-6 takes over, by design)
        q, k = (scale * torch.randn(2, 4, 32, 16, generator=gen, dtype=F64) for _ in range(2))
        qn, kn = norm(q, k)
        torch.testing.assert_close(qn.pow(2).mean(-1), torch.ones(2, 4, 32, dtype=F64), rtol=1e-3, atol=0)
        assert (qn @ kn.transpose(-1, -2) / 4).abs().max() <= 4 + 1e-9


def test_the_time_embedding_stays_fp32_under_autocast_unless_asked_otherwise():
    a, b = torch.rand(4), torch.rand(4)
    for precision, dtype in (("fp32", torch.float32), ("autocast", torch.bfloat16)):
        dit = build_dit(DiTParams(depth=1, hidden=32, heads=2, time_precision=precision), (2, 8, 8), torch.ones(1))
        unet = build_unet(UNetParams(channels=8, channel_mult=[1], time_precision=precision), (2, 8, 8), torch.ones(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert dit.t_embedder(a).dtype == dtype and unet.embed(a, b).dtype == dtype, precision


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_central_differences_converge_at_second_order_to_the_exact_jvp(kind):
    """Away from the domain's edges: the error falls 100× per 10× smaller ε (truncation O(ε²)); at ε = 1e-4 in
    float64 it is below 1e-7 (measured: DiT up to 1.1e-8, UNet up to 4.5e-8; rounding takes over near 1e-6)."""
    net = networks("sdpa")[kind]
    x, a, b = inputs()
    for name, tangent in tangents_of(net, x, a, b).items():
        v, exact = CountingNet(net).jvp((x, a, b), tangent)
        errors = {}
        for eps in (1e-2, 1e-3, 1e-4):
            fd = CountingNet(net, jvp=JvpConfig(mode="finite_difference", eps=eps))
            v_fd, dv = fd.jvp((x, a, b), tangent)
            assert relative(v_fd, v) < 1e-12 and fd.counts.forwards == 3 * len(x) and fd.counts.jvps == 0
            errors[eps] = relative(dv, exact)
        assert errors[1e-4] < 1e-7, (name, errors)
        assert 30 < errors[1e-2] / errors[1e-3] < 300 and 30 < errors[1e-3] / errors[1e-4] < 300, (name, errors)


def test_steps_that_would_leave_the_time_domain_are_one_sided():
    """A step may not cross the diagonal a = b nor leave [0, 1]: there the difference is one-sided (error O(ε));
    a point with no valid step gets 0 and is counted."""
    net = networks("sdpa")["dit"]
    x = inputs(4)[0]
    a = torch.tensor([0.3, 0.0, 0.2, 0.0], dtype=F64)
    b = torch.tensor([0.3, 0.5, 1.0, 1.0], dtype=F64)
    # along a on the diagonal (backward only), along a from 0 (forward only), along b at 1 (backward only), and
    # along both from (0, 1): neither step stays inside
    da, db = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=F64), torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=F64)
    tangent = (torch.randn_like(x), da, db)
    _, exact = CountingNet(net).jvp((x, a, b), tangent)
    errors = {}
    for eps in (1e-3, 1e-4):
        fd = CountingNet(net, jvp=JvpConfig(mode="finite_difference", eps=eps))
        _, dv = fd.jvp((x, a, b), tangent)
        assert torch.isfinite(dv).all() and fd.counts.unresolved == 1 and torch.equal(dv[3], torch.zeros_like(dv[3]))
        errors[eps] = [relative(dv[i], exact[i]) for i in range(3)]
    for i in range(3):  # first order: 10× per decade
        assert errors[1e-4][i] < 1e-3 and 5 < errors[1e-3][i] / errors[1e-4][i] < 20, errors


def test_finite_differences_draw_the_same_dropout_as_the_pass_they_difference():
    net = networks("sdpa", dropout=0.3)["unet"].train()
    x, a, b = inputs()
    tangent = tangents_of(net, x, a, b)["meanflow"]
    torch.manual_seed(5)
    _, exact = CountingNet(net).jvp((x, a, b), tangent)  # one dropout mask for the primal and its tangent
    torch.manual_seed(5)
    fd = CountingNet(net, jvp=JvpConfig(mode="finite_difference", eps=1e-4))
    _, dv = fd.jvp((x, a, b), tangent)
    assert relative(dv, exact) < 1e-6
    eps = 1e-4  # negative control: the same differences with fresh draws for each pass are noise
    ahead = net(*(p + eps * t for p, t in zip((x, a, b), tangent)))
    behind = net(*(p - eps * t for p, t in zip((x, a, b), tangent)))
    assert relative((ahead - behind) / (2 * eps), exact) > 1e-2


@pytest.mark.parametrize(
    "options, expected",
    [
        (["model.attention=jvp_kernel"], "model.attention: jvp_kernel needs a CUDA GPU"),
        (
            ["method.name=lsd", "model.attention=jvp_kernel"],
            "passes no gradient through the tangent, which method 'lsd'",
        ),
        (
            ["train.jvp.mode=finite_difference", "model.attention=jvp_kernel"],
            "train.jvp.mode finite_difference has none",
        ),
        (["train.jvp.mode=finite_difference", "train.jvp.eps=0"], "train.jvp.eps"),
        (["train.jvp.mode=central"], "train.jvp.mode"),
        (["model.attention=flash"], "model.attention"),
    ],
)
def test_back_ends_that_cannot_serve_a_trial_are_refused_at_validation(tmp_path, capsys, options, expected):
    study = ["plan", "studies/jvp_backends.yaml", "--profile", "smoke", *options]
    with pytest.raises(SystemExit) as refused:
        main(study)
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def train_200_steps(method: dict, jvp: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(initial parameters, final parameters, the method's unweighted loss per step, the last step's statistics)
    of 200 steps on CPU."""
    trainer = trainer_for(
        {"method": method, "model": {"width": 32, "depth": 2}},
        {"batch_size": 128, "lr": 3e-3, "jvp": jvp, "ema": [0.99]},
    )
    start = torch.cat([p.detach().flatten().clone() for p in trainer.net.parameters()])
    stats = [trainer.train_step(with_stats=True) for _ in range(200)]
    losses = torch.tensor([s[f"train/loss/{method['name']}"] for s in stats])
    return start, torch.cat([p.detach().flatten() for p in trainer.net.parameters()]), losses, stats[-1]


@pytest.mark.slow
@pytest.mark.parametrize("method", [{"name": "meanflow"}, {"name": "sct", "warmup_steps": 20}, {"name": "lsd"}])
def test_training_with_finite_differences_follows_training_with_exact_jvps(method):
    """200 steps of the same trial (same seed, same draws), fp32 on CPU, with exact and with finite-difference
    JVPs (ε = 1e-3): the parameters differ by under 1e-5 of how far training moved them (measured 5e-7 to
    1.6e-6, fp32 rounding) and the loss curves by under 1e-3 on average (measured up to 1e-4). A coarse ε = 0.1,
    whose derivative is off by O(ε²), lands at least 10× farther: the comparison sees a wrong JVP."""
    start, exact, exact_losses, exact_stats = train_200_steps(method, {"mode": "exact"})
    _, fd, fd_losses, fd_stats = train_200_steps(method, {"mode": "finite_difference", "eps": 1e-3})
    _, coarse, _, _ = train_200_steps(method, {"mode": "finite_difference", "eps": 0.1})
    assert JVP_UNRESOLVED in fd_stats and JVP_UNRESOLVED not in exact_stats  # logged where it can happen
    moved = (exact - start).norm()
    assert (fd - exact).norm() / moved < 1e-5
    assert ((fd_losses - exact_losses).abs() / exact_losses).mean() < 1e-3
    assert (coarse - exact).norm() > 10 * (fd - exact).norm()
