"""Fidelity to each method's reference implementation: shortcut models' finest bootstrap level and σ_min, and the
loss scale over data dimensions (docs/methods.md, "References and conventions")."""

import math

import pytest
import torch
from torch import nn

from orch.execution.build import build_section
from orch.methods.contracts.interpolants import LinearInterpolant
from orch.methods.contracts.method import Setting
from orch.methods.losses.shortcut import ShortcutParams, bootstrap_term
from orch.methods.training.trainer import TrainConfig, Trainer
from orch.trial.config import resolve_trial_config

DIMS, STD = 16, 0.5


class JumpRecorder(nn.Module):
    """v ≡ 0, remembering every jump length b − a it is asked for."""

    def __init__(self):
        super().__init__()
        self.jumps: set[float] = set()

    def forward(self, x, a, b):
        self.jumps |= {round(j, 12) for j in (b - a).tolist()}
        return torch.zeros_like(x)


def test_the_finest_bootstrap_step_rests_on_the_flow_matching_level():
    """With 7 levels, d = 1/64 is built from two half-steps of 1/128: the reference evaluates them at its
    flow-matching level (the instantaneous velocity), since no term trains a 1/128 jump."""
    target_net, student = JumpRecorder(), JumpRecorder()
    n = 8
    x, t = torch.randn(n, 2), torch.zeros(n)
    bootstrap_term(target_net, student, x, t, torch.full((n,), 1 / 64), 1 / 128, None)
    assert target_net.jumps == {0.0}  # both half-steps are v(·; τ, τ)
    bootstrap_term(target_net, student, x, t, torch.full((n,), 1 / 32), 1 / 128, None)
    assert target_net.jumps == {0.0, 1 / 64}  # one level up: half-steps on the next trained level


def test_every_jump_a_shortcut_target_asks_for_is_one_a_term_trains():
    params = ShortcutParams(bootstrap_every=1, bootstrap_target="live")  # every sample bootstraps, live net
    setting = Setting(LinearInterpolant(torch.ones(2)), None, 1.0)
    method = build_section({"method": {"name": "shortcut", **params.model_dump()}}, "method", setting)
    net = JumpRecorder()
    terms = method.terms(net, torch.randn(7 * 64, 2), 0, torch.Generator().manual_seed(0))
    trained = {0.0} | {round(j, 12) for term in terms for j in (term.b - term.a).tolist()}
    assert trained == {0.0} | {0.5**k for k in range(7)}
    assert net.jumps <= trained, f"asked for untrained jumps {sorted(net.jumps - trained)}"


def test_shortcut_uses_the_references_sigma_min_interpolant():
    assert ShortcutParams().sigma_min == 1e-5
    n, gen = 64, torch.Generator().manual_seed(3)
    setting = Setting(LinearInterpolant(torch.full((2,), 0.7)), None, 0.7)
    method = build_section({"method": {"name": "shortcut", "bootstrap_target": "live"}}, "method", setting)
    x1 = torch.randn(n, 2)
    (diag, _) = method.terms(JumpRecorder(), x1, 0, gen)
    x0 = LinearInterpolant(torch.full((2,), 0.7)).sample_base(n, (2,), torch.Generator().manual_seed(3))
    assert torch.allclose(diag.target, x1[n // 8 :] - (1 - 1e-5) * x0[n // 8 :], atol=1e-7)
    assert not torch.allclose(diag.target, x1[n // 8 :] - x0[n // 8 :], atol=1e-7)  # σ_min = 0 would differ
    at_data = method.interpolant.interpolate(x0, x1, torch.ones(n))
    assert torch.allclose(at_data, x1 + 1e-5 * x0)


# ---- loss scale over data dimensions ----------------------------------------------------------------------------

REFERENCE_REDUCTION = {  # what each method's reference implementation does with a sample's squared error
    **dict.fromkeys(["fm", "lsd", "esd", "psd_mid", "psd_unif"], "sum"),  # paper A's code
    "meanflow": "sum",  # py-meanflow
    "ict": "sum",  # iCT's pseudo-Huber on the L2 norm, c = 0.00054·√D
    **dict.fromkeys(["sdei", "stei", "sdee", "stee"], "mean"),  # paper B's mean_flat
    "shortcut": "mean",  # the reference's plain MSE
    **dict.fromkeys(["sct", "scd"], "mean_div_d"),  # the sCM reference: mean over dims, divided by D again
}


@pytest.mark.parametrize("method", sorted(REFERENCE_REDUCTION))
def test_the_default_reduction_is_the_references(method):
    config, problems = resolve_trial_config({"method": {"name": method}})
    assert not problems
    assert config["train"]["dim_reduction"] == REFERENCE_REDUCTION[method]


def test_an_explicit_reduction_overrides_the_reference():
    config, _ = resolve_trial_config({"method": {"name": "sdei"}, "train": {"dim_reduction": "sum"}})
    assert config["train"]["dim_reduction"] == "sum"


class Gaussian:
    """DIMS-dimensional N(0, STD²) data: with the base N(0, STD²), x1 − x0 has E‖x1 − x0‖² = 2·STD²·DIMS."""

    shape = (DIMS,)
    std = torch.full((DIMS,), STD)

    def sample(self, n, gen):
        return torch.randn(n, DIMS, generator=gen) * STD


class Constant(nn.Module):
    """v(x; a, b) ≡ value (zero JVPs); a parameter so that an optimiser can be built over it."""

    def __init__(self, value: float):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(value))

    def forward(self, x, a, b):
        return torch.zeros_like(x) + self.value


def trainer_for(method: dict, net: nn.Module, train: dict | None = None, teacher: nn.Module | None = None) -> Trainer:
    """A trainer of `method` on the Gaussian data with the resolved default train config (plus `train`)."""
    config, problems = resolve_trial_config({"method": method, "train": {"device": "cpu", **(train or {})}})
    assert not problems
    setting = Setting(LinearInterpolant(Gaussian.std), None, STD, teacher)
    make_method = lambda s: build_section(config, "method", s)  # noqa: E731
    return Trainer(
        net, make_method, setting, Gaussian(), TrainConfig.model_validate(config["train"]), torch.device("cpu")
    )


def batch_loss(trainer: Trainer, n: int = 8192, step: int = 0) -> float:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return trainer.loss(trainer.method.terms(trainer.net, trainer.dataset.sample(n, gen), step, gen))[0].item()


FM_SQ = 2 * STD**2  # E(x1 − x0)² per dimension


@pytest.mark.parametrize(
    "method, expected",
    [
        ({"name": "fm"}, FM_SQ * DIMS),  # sum over dimensions
        ({"name": "meanflow", "adaptive_p": 0.0}, FM_SQ * DIMS),  # zero JVP: target x1 − x0, summed
        ({"name": "lsd"}, 0.75 * FM_SQ * DIMS),  # the off-diagonal residual of a constant map is 0
        ({"name": "stee"}, FM_SQ),  # mean over dimensions
        ({"name": "stei", "init_from_teacher": False}, FM_SQ / 2),  # own target 0; λ·FM on half the terms
        ({"name": "shortcut"}, (1 - 1 / 8) * STD**2 * (1 + (1 - 1e-5) ** 2)),  # bootstrap residual 0
    ],
    ids=lambda v: v["name"] if isinstance(v, dict) else "",
)
def test_loss_scale_of_a_zero_network_in_closed_form(method, expected):
    assert batch_loss(trainer_for(method, Constant(0.0))) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("method", ["sdei", "sdee"])
def test_secant_distillation_onto_a_constant_teacher_is_its_square_per_dimension(method):
    """A zero student regressed onto a teacher v_T ≡ 0.3: the reference's mean_flat gives exactly 0.09 per sample;
    a sum over dimensions (asked for explicitly) gives 0.09·D."""
    teacher = Constant(0.3).requires_grad_(False)
    mean = batch_loss(trainer_for({"name": method}, Constant(0.0), teacher=teacher), n=256)
    summed = batch_loss(trainer_for({"name": method}, Constant(0.0), {"dim_reduction": "sum"}, teacher), n=256)
    assert mean == pytest.approx(0.09, rel=1e-5)
    assert summed == pytest.approx(0.09 * DIMS, rel=1e-5)


def test_scm_loss_is_its_references_mean_over_dimensions_divided_by_d():
    """sCM's reference: (1/D)·mean_d(F_θ − F⁻ − g)² per sample; orch's term is that residual times S·σ_d, so the
    loss must be w·Σ_d(pred − target)²/D² with the term's weight w = 1/(S σ_d)² (and the prior 1/σ)."""
    torch.manual_seed(0)
    mlp = build_section({"model": {"name": "mlp", "width": 32, "depth": 2}}, "model", (DIMS,), Gaussian.std)
    trainer = trainer_for({"name": "sct"}, mlp)
    gen = torch.Generator().manual_seed(1)
    (term,) = trainer.method.terms(trainer.net, trainer.dataset.sample(512, gen), 5000, gen)
    expected = (term.weight * (term.pred - term.target).pow(2).mean(1) / DIMS).mean().item()
    assert expected > 0 and math.isfinite(expected)
    assert trainer.loss([term])[0].item() == pytest.approx(expected, rel=1e-6)


def test_consistency_sampling_draws_fresh_noise_for_every_chunk():
    """Evaluations generate in chunks of eval.batch_size: a fixed re-noising seed per call gave every chunk the
    same noise (samples correlated across chunks, KL at 8–16 steps far off). Each chunk's noise must be new,
    and a seeded evaluation reproducible."""
    from orch.methods.contracts.flow_map import sample_consistency

    zero = Constant(0.0)  # X_{τ,1}(x) = x: the output is a mix of x0 and the re-noising draws
    x0, std = torch.randn(256, 2), torch.ones(2)
    gen = torch.Generator().manual_seed(5)
    first, second = (sample_consistency(zero, x0, 8, 0.01, std, gen) for _ in range(2))
    assert not torch.allclose(first, second)
    again = sample_consistency(zero, x0, 8, 0.01, std, torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
