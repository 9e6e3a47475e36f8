"""A real short training run learns, and resume from a checkpoint is exact."""

import io

import pytest
import torch

from orch.execution.build import build_trainer
from orch.methods.training.trainer import Diverged, EvalConfig
from orch.trial.config import resolve_trial_config
from orch.trial.typed import TrialConfig


def trainer_for(method: str, steps: int, width: int = 64, depth: int = 3, lr: float = 3e-3):
    config, problems = resolve_trial_config(
        {
            "method": {"name": method},
            "model": {"width": width, "depth": depth},
            "train": {"steps": steps, "batch_size": 512, "lr": lr, "ema": [0.99], "device": "cpu"},
        }
    )
    assert not problems, problems
    return build_trainer(TrialConfig.parse(config), torch.device("cpu"))


@pytest.mark.slow
def test_short_training_lowers_kl_on_the_checkerboard():
    torch.set_num_threads(1)
    trainer = trainer_for("lsd", 1500, width=128, depth=4, lr=5e-3)  # the main study's network, fewer steps
    evaluation = EvalConfig(nfe=[4, 16], metrics=["kl"], num_samples=20000, ema=0.99)
    before, _ = trainer.evaluate(evaluation)
    for _ in range(1500):
        trainer.train_step()
    after, _ = trainer.evaluate(evaluation)
    for key in before:
        assert after[key] < before[key] - 0.2, (key, before[key], after[key])


def test_resume_from_a_checkpoint_continues_exactly():
    straight = trainer_for("psd_unif", 20)
    for _ in range(20):
        straight.train_step()

    first = trainer_for("psd_unif", 20)
    for _ in range(10):
        first.train_step()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = trainer_for("psd_unif", 20)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(10):
        resumed.train_step()

    for p, q in zip(straight.net.parameters(), resumed.net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for p, q in zip(straight.ema.nets[0.99].parameters(), resumed.ema.nets[0.99].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert resumed.cost()["cost/fwd_per_sample"] == straight.cost()["cost/fwd_per_sample"]


def test_divergence_detectors_stop_training_with_a_reason():
    """Non-finite parameters (here a learning rate of 1e300, finite but past float32's range, turns a finite step
    into inf/NaN weights) and a target-norm blow-up above train.max_target_norm each raise Diverged with their
    reason."""
    trainer = trainer_for("fm", 5, lr=1e300)
    with pytest.raises(Diverged, match="non-finite parameters"):
        trainer.train_step(with_stats=True)
    config, _ = resolve_trial_config({"method": {"name": "lsd"}, "train": {"max_target_norm": 1e-3, "device": "cpu"}})
    with pytest.raises(Diverged, match=r"target norm .* above train.max_target_norm 0.001"):
        build_trainer(TrialConfig.parse(config), torch.device("cpu")).train_step()
    config, _ = resolve_trial_config({"method": {"name": "lsd"}, "train": {"max_target_norm": 1e6, "device": "cpu"}})
    build_trainer(TrialConfig.parse(config), torch.device("cpu")).train_step()  # control: a sane limit does not fire


def test_micro_batches_accumulate_the_gradient_and_statistics_of_the_whole_batch():
    """With train.micro_batches = 2 a step back-propagates the batch in two halves; its gradient must be that of
    the mean of the halves' losses, and its logged statistics those of the whole batch (LSD: two terms and a JVP,
    with the learned weight)."""
    overrides = {
        "method": {"name": "lsd"},
        "model": {"width": 32, "depth": 2},
        "train": {"batch_size": 64, "micro_batches": 2, "grad_clip": None, "weighting": "logvar", "device": "cpu"},
    }
    config, problems = resolve_trial_config(overrides)
    assert not problems, problems
    parsed = TrialConfig.parse(config)
    stepped, oracle = build_trainer(parsed, torch.device("cpu")), build_trainer(parsed, torch.device("cpu"))
    stats = stepped.train_step(with_stats=True)

    x1 = oracle.dataset.sample(64, oracle.gen)
    halves = [oracle.method.terms(oracle.net, part, 0, oracle.gen) for part in x1.chunk(2)]
    loss = sum(oracle.loss(terms)[0] for terms in halves) / 2
    params = [p for g in oracle.optimizer.param_groups for p in g["params"]]
    expected = torch.autograd.grad(loss, params)
    actual = [p.grad for g in stepped.optimizer.param_groups for p in g["params"]]
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want)
    assert stats["train/loss"] == pytest.approx(loss.item())
    for name in ("diag", "lsd"):
        norms = torch.cat([t.target_norms() for terms in halves for t in terms if t.name == name])
        assert stats[f"train/target_std/{name}"] == pytest.approx(norms.std().item())


def test_micro_batches_must_divide_the_batch():
    _, problems = resolve_trial_config({"train": {"batch_size": 512, "micro_batches": 3}})
    assert [p.path for p in problems] == ["train.micro_batches"]
    assert "does not divide train.batch_size 512" in problems[0].message
