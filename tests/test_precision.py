"""train.precision, train.compile and the attention kernels: every method trains under each precision, bf16
reproduces the fp32 curve and ranking of a checker study, fp16 overflow skips are counted (never divergence), and
compiled or fused-kernel passes equal the eager, exact ones."""

import io

import pytest
import torch

from orch.execution.build import build_trainer
from orch.methods.catalog import METHODS
from orch.methods.runtime.attention import attention, tangent_attention
from orch.methods.training.trainer import EvalConfig
from orch.trial.config import resolve_trial_config, trial_id
from orch.trial.typed import TrialConfig
from tests.trainers import frozen_priors


def trainer_for(method: str, width: int = 32, depth: int = 2, **train):
    config, problems = resolve_trial_config(
        {
            "method": {"name": method},
            "model": {"width": width, "depth": depth},
            "train": {"batch_size": 256, "device": "cpu", **train},
        }
    )
    assert not problems, problems
    parsed = TrialConfig.parse(config)
    return build_trainer(parsed, torch.device("cpu"), **frozen_priors(config))


@pytest.mark.parametrize("method", METHODS.names())
@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_every_method_trains_under_each_precision_with_fp32_master_weights(precision, method):
    trainer = trainer_for(method, precision=precision)
    half: list[torch.dtype] = []
    trainer.net.net.layers[-1].register_forward_hook(lambda module, args, out, seen=half: seen.append(out.dtype))
    for _ in range(3):
        stats = trainer.train_step(with_stats=True)
    assert torch.isfinite(torch.tensor(stats["train/loss"]))
    expected = {"tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert half and set(half) == {expected}, set(half)  # the passes ran autocast
    networks = [trainer.net.net, *trainer.ema.nets.values()]
    assert all(p.dtype == torch.float32 for net in networks for p in net.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())
    assert ("train/amp_skipped_steps" in stats) == (precision == "fp16")


TINY_UNET = {"name": "unet", "channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [14],
             "time_scale": 1000.0}  # fmt: skip


SMALL_BATCH = {"cmt": {"nfe": 4}}
"""Options a method needs to train on a batch of 4 (CMT's batch holds whole trajectories of `nfe` points)."""


def unet_trainer_for(method: str, precision: str):
    config, problems = resolve_trial_config(
        {
            "dataset": {"name": "mnist", "limit": 64},
            "method": {"name": method, **SMALL_BATCH.get(method, {})},
            "model": TINY_UNET,
            "train": {"batch_size": 4, "device": "cpu", "precision": precision},
            "eval": {"metrics": ["fid"]},
        }
    )
    assert not problems, problems
    parsed = TrialConfig.parse(config)
    return build_trainer(parsed, torch.device("cpu"), **frozen_priors(config))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.slow
def test_every_method_trains_a_unet_with_attention_under_half_precision(precision):
    """Convolutions, group norms and attention under autocast, in the JVP passes too (an autocast group norm
    once broke every JVP method's convolutions: methods/networks/unet.py GroupNorm32)."""
    for method in METHODS.names():
        stats = unet_trainer_for(method, precision).train_step(with_stats=True)
        assert torch.isfinite(torch.tensor(stats["train/loss"])), (method, precision)


def test_unet_jvp_under_bf16_autocast_is_the_fp32_jvp_to_bf16_rounding():
    """The JVP pass of a UNet with attention under bf16 autocast (exact attention, as CountingNet.jvp runs it)
    against the fp32 JVP."""
    net = unet_trainer_for("fm", "fp32").net.net
    with torch.no_grad():  # a network whose output layer is not zero, so that the tangent is not trivially 0
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(0)
    x, a = torch.randn(4, 1, 28, 28, generator=gen), torch.rand(4, generator=gen) * 0.5
    primals, tangents = (x, a, a + 0.3), (torch.randn(4, 1, 28, 28, generator=gen), torch.ones(4), torch.ones(4))
    f = net.forward
    v, dv = torch.func.jvp(f, primals, tangents)
    with torch.autocast("cpu", dtype=torch.bfloat16), tangent_attention():
        v16, dv16 = torch.func.jvp(f, primals, tangents)
    assert v16.dtype == dv16.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa (0.4% per rounding); through the network's layers the relative error grows
    # to about 1% on the output and 3% on the tangent (measured: 0.011 and 0.029)
    assert (v16.float() - v).norm() / v.norm() < 0.03
    assert (dv16.float() - dv).norm() / dv.norm() < 0.06


def test_auto_precision_is_fp32_on_cpu_and_keeps_trial_ids():
    assert trainer_for("fm").precision == "fp32"
    config, _ = resolve_trial_config({"train": {"precision": "auto"}})
    explicit, _ = resolve_trial_config({"train": {"precision": "bf16"}})
    assert config["train"]["precision"] == "auto"
    identity = trial_id(config)
    del config["train"]["precision"]  # a config written before train.precision existed
    assert trial_id(config) == identity != trial_id(explicit)


@pytest.mark.slow
def test_bf16_reproduces_the_fp32_curve_and_kl_ranking_of_a_checker_study():
    """600 steps of four methods on the checkerboard: the logged losses agree within 1% at every tick (measured:
    4e-4) and KL at 1 and 4 steps within 0.02 nats (measured: 0.001), so the ranking of methods is the same."""
    torch.set_num_threads(1)
    evaluation = EvalConfig(nfe=[1, 4], metrics=["kl"], num_samples=20000, ema=0.99)
    kl = {}
    for method in ("fm", "lsd", "meanflow", "psd_mid"):
        curves = {}
        for precision in ("fp32", "bf16"):
            trainer = trainer_for(method, 64, 3, batch_size=512, lr=5e-3, ema=[0.99], precision=precision)
            ticks = [trainer.train_step(with_stats=(k + 1) % 50 == 0) for k in range(600)]
            curves[precision] = torch.tensor([s["train/loss"] for s in ticks if s])
            kl[method, precision], _ = trainer.evaluate(evaluation)
        torch.testing.assert_close(curves["bf16"], curves["fp32"], rtol=1e-2, atol=0)
        for key, value in kl[method, "fp32"].items():
            assert kl[method, "bf16"][key] == pytest.approx(value, abs=0.02), (method, key)
    for key in kl["fm", "fp32"]:
        ranking = {
            p: sorted(("fm", "lsd", "meanflow", "psd_mid"), key=lambda m: kl[m, p][key]) for p in ("fp32", "bf16")
        }
        assert ranking["bf16"] == ranking["fp32"], (key, ranking)


def test_fp16_overflow_skips_are_counted_not_divergence_and_resume_with_the_scaler():
    """An absurd initial loss scale overflows the fp16 gradients: the scaler skips those steps (parameters
    unchanged), counts them and halves its scale until training proceeds; its state survives a checkpoint."""
    trainer = trainer_for("fm", precision="fp16")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    before = [p.detach().clone() for p in trainer.net.parameters()]
    stats = trainer.train_step(with_stats=True)
    assert stats["train/amp_skipped_steps"] == 1 and stats["train/loss_scale"] == 2.0**39
    assert all(torch.equal(p, q) for p, q in zip(before, trainer.net.parameters()))
    for _ in range(40):
        stats = trainer.train_step(with_stats=True)
    assert stats["train/loss_scale"] < 2.0**30 and stats["train/amp_skipped_steps"] >= 10
    assert not all(torch.equal(p, q) for p, q in zip(before, trainer.net.parameters()))  # it trains again
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    buffer.seek(0)
    resumed = trainer_for("fm", precision="fp16")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.scaler.get_scale() == trainer.scaler.get_scale()
    assert resumed.amp_skipped_steps == trainer.amp_skipped_steps


@pytest.mark.parametrize("method", ["fm", "lsd"])
def test_compiled_networks_train_as_the_eager_ones(method):
    """train.compile: the network's module call is compiled (state-dict keys unchanged), JVP passes (LSD) run
    the eager forward; five steps equal the eager run to float rounding."""
    eager, fast = trainer_for(method), trainer_for(method, compile=True)
    for _ in range(5):
        eager.train_step()
        fast.train_step()
    assert list(fast.net.net.state_dict()) == list(eager.net.net.state_dict())
    for p, q in zip(eager.net.parameters(), fast.net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_fused_attention_equals_the_exact_path_and_jvps_take_the_exact_one():
    """SDPA (fused kernels, no forward-mode AD) and the explicit softmax give the same attention; inside a JVP
    pass the exact path is taken, so forward-mode AD goes through and equals a finite difference."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, dq = (torch.randn(2, 3, 10, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    with tangent_attention():
        exact = attention(q, k, v)
        _, tangent = torch.func.jvp(lambda q: attention(q, k, v), (q,), (dq,))
    torch.testing.assert_close(attention(q, k, v), exact)
    eps = 1e-6
    finite = (attention(q + eps * dq, k, v) - attention(q - eps * dq, k, v)) / (2 * eps)
    torch.testing.assert_close(tangent, finite, rtol=1e-6, atol=1e-8)
    with pytest.raises(NotImplementedError):  # why the JVP path needs the exact kernel
        torch.func.jvp(lambda q: attention(q, k, v), (q,), (dq,))


def test_float64_stays_float64_through_the_network_and_a_jvp_loss():
    """Casts promote, never demote: a float64 network keeps a difference float32 cannot hold, and MeanFlow's
    per-sample loss in float64 equals the same loss written out by hand in float64 to 1e-12 (a float32 rounding
    anywhere, the control shows, is 1e-8 or more)."""
    from orch.methods.contracts.counting import CountingNet
    from orch.methods.contracts.method import L2
    from orch.methods.losses.meanflow import meanflow_term
    from orch.methods.networks.mlp import MLPParams, build_mlp

    torch.manual_seed(0)
    net = build_mlp(MLPParams(width=32, depth=2), (2,), torch.tensor([0.7, 1.3])).double()
    gen = torch.Generator().manual_seed(1)
    n, f64 = 64, torch.float64
    x, v = torch.randn(n, 2, generator=gen, dtype=f64), torch.randn(n, 2, generator=gen, dtype=f64)
    a = torch.rand(n, generator=gen, dtype=f64)
    b = a + (1 - a) * torch.rand(n, generator=gen, dtype=f64)

    nudged = net(x + 1e-12, a, b) - net(x, a, b)  # 1e-12 is far below float32's resolution at |x| ~ 1
    assert nudged.dtype == f64 and nudged.abs().max() > 0

    loss = meanflow_term(CountingNet(net), x, a, b, v, L2).sq_error()
    u, du = torch.func.jvp(net, (x, a, b), (v, torch.ones_like(a), torch.zeros_like(b)))
    target = v + (b - a)[:, None] * du
    by_hand = ((u - target) ** 2).sum(1)
    assert loss.dtype == f64
    assert (loss - by_hand).abs().max() <= 1e-12 * by_hand.abs().max()
    rounded = ((u.float() - target.float()) ** 2).sum(1).double()  # control: the float32 rounding of old
    assert (rounded - by_hand).abs().max() > 1e-10 * by_hand.abs().max()
