"""Each stop-gradient placement detaches exactly what docs/methods.md §3.2 says, and cost counts match §3.4."""

import pytest
import torch
from torch import nn

from orch.execution.build import build_trainer
from orch.methods.catalog import METHODS
from orch.methods.contracts.counting import CountingNet
from orch.methods.losses.self_distillation import esd_term, lsd_term, psd_term
from orch.trial.config import resolve_trial_config
from orch.trial.typed import TrialConfig
from tests.trainers import frozen_priors


class TwoHeads(nn.Module):
    """v(x; a, b) with separate parameters on the diagonal (a = b) and off it, so a gradient's path shows up as
    which head receives it: teacher velocities v(·; τ, τ) live in `diag`, jumps in `off`."""

    def __init__(self):
        super().__init__()
        self.diag = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
        self.off = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x, a, b):
        h = torch.cat([a[:, None], b[:, None], x], 1)
        return torch.where((a == b)[:, None], self.diag(h), self.off(h))


def heads_with_gradient(net: TwoHeads, output: torch.Tensor) -> set[str]:
    if not output.requires_grad:
        return set()
    weights = torch.randn_like(output)
    heads = {"diag": list(net.diag.parameters()), "off": list(net.off.parameters())}
    found = set()
    for name, params in heads.items():
        grads = torch.autograd.grad((output * weights).sum(), params, retain_graph=True, allow_unused=True)
        if any(g is not None and g.abs().sum() > 0 for g in grads):
            found.add(name)
    return found


def make_term(name: str, stopgrad: str, net: nn.Module):
    torch.manual_seed(0)
    x, u = torch.randn(64, 2), torch.rand(2, 64)
    a, b = u.min(0).values, u.max(0).values
    wrapped = CountingNet(net)
    teacher = TwoHeads().requires_grad_(False)  # FMM: a frozen teacher's velocity instead of the own diagonal
    velocity = (lambda y, t: teacher(y, t, t)) if name.startswith("fmm") else None
    if name.endswith("lsd"):
        return lsd_term(wrapped, x, a, b, stopgrad, velocity)
    if name.endswith("esd"):
        return esd_term(wrapped, x, a, b, stopgrad, velocity)
    return psd_term(wrapped, x, a, b, torch.rand(64), stopgrad)


@pytest.mark.parametrize(
    "name, stopgrad, target_heads",
    [
        ("lsd", "convex", set()),  # teacher input X_{a,b} and output v(X; b, b) detached
        ("lsd", "none", {"diag", "off"}),  # gradient through the teacher and through X_{a,b}
        ("esd", "full", set()),  # b̂ and the spatial JVP detached (Algorithm 3)
        ("esd", "convex", {"off"}),  # only b̂ detached: gradient through the spatial Jacobian of the jump
        ("esd", "none", {"diag", "off"}),
        ("psd", "convex", set()),  # both teacher jumps detached
        ("psd", "none", {"off"}),
        ("fmm_lsd", "convex", set()),  # FMM-LMD: the teacher's input detached
        ("fmm_lsd", "none", {"off"}),  # gradient through the teacher's input X_{a,b}, never into the teacher
        ("fmm_esd", "full", set()),  # FMM-EMD: the advective term detached
        ("fmm_esd", "none", {"off"}),  # gradient through the spatial Jacobian of the jump
    ],
)
def test_stopgrad_detaches_exactly_the_specified_parts(name, stopgrad, target_heads):
    net = TwoHeads()
    term = make_term(name, stopgrad, net)
    assert heads_with_gradient(net, term.pred) == {"off"}  # the student is always the jump itself
    assert heads_with_gradient(net, term.target) == target_heads


def one_step_trainer(method: dict, batch: int = 1024):
    """A trainer of `method` after one step on the checkerboard (a small MLP; any frozen network as teacher and as
    prior stage)."""
    config, problems = resolve_trial_config(
        {"method": method, "model": {"width": 16, "depth": 2}, "train": {"batch_size": batch, "device": "cpu"}}
    )
    assert not problems
    trainer = build_trainer(TrialConfig.parse(config), torch.device("cpu"), **frozen_priors(config))
    trainer.train_step()
    return trainer


def one_step_cost(method: str, stopgrad: str | None) -> dict[str, float]:
    params = {"name": method} | ({"stopgrad": stopgrad} if stopgrad else {})
    if method == "stei" and stopgrad:  # here the "stopgrad" column names STEI's target variant
        params = {"name": method, "target": stopgrad}
    return one_step_trainer(params).cost()


@pytest.mark.parametrize(
    "method, stopgrad, fwd, jvp",
    [
        # η = 0.75 of the batch is diagonal (1 forward each); per off-diagonal sample (docs/methods.md §3.4):
        ("fm", None, 1.0, 0.0),
        ("lsd", "convex", 0.75 + 0.25, 0.25),  # forward+JVP_b with grad, teacher forward
        ("esd", "full", 0.75 + 0.25, 0.5),  # teacher b̂, JVP_a with grad, spatial JVP (as coded: 1 + 2C)
        ("psd_mid", "convex", 0.75 + 3 * 0.25, 0.0),  # student + two teacher forwards
        ("psd_unif", "none", 0.75 + 3 * 0.25, 0.0),
        # paper B (docs/methods.md §4.4), teacher evaluations included; every sample is a secant sample
        ("stee", None, 2.0, 0.0),  # estimator (no grad) + student
        ("sdei", None, 3.0, 0.0),  # estimator + teacher + student
        ("sdee", None, 3.0, 0.0),
        ("stei", "self", 4.0, 0.0),  # estimator + own diagonal + student + diffusion term
        ("stei", "teacher", 4.0, 0.0),
        # baselines
        ("meanflow", None, 1.0, 1.0),  # student forward + no-grad JVP for the target
        ("sct", None, 1.0, 1.0),
        ("scd", None, 2.0, 1.0),  # + teacher velocity
        ("ict", None, 2.0, 0.0),  # two noise levels
        ("shortcut", None, 7 / 8 + 3 / 8, 0.0),  # 1/8 bootstrap samples: 2 EMA forwards + student
        # distillation of flow maps (docs/methods.md §10), no diagonal rows
        ("fmm_lmd", "convex", 1.0, 1.0),  # JVP along b with grad, the teacher at the landing point
        ("fmm_emd", "full", 1.0, 2.0),  # the teacher's b̂, the JVPs along a and along b̂
        ("ayf_emd", None, 2.0, 1.0),  # the student, b̂, the no-grad JVP along the teacher's flow
        ("ayf_lmd", None, 2.0, 1.0),  # the student, the no-grad JVP along b, b̂ at the landing point
        ("dmf", None, 2.0, 1.0),  # the flow-matching forward, the jump's forward and its no-grad JVP
        ("ect", None, 2.0, 0.0),  # the student at σ_t, the no-grad target at σ_r (the teacher only initialises)
    ],
)
def test_measured_network_evaluations_per_sample(method, stopgrad, fwd, jvp):
    cost = one_step_cost(method, stopgrad)
    assert cost["cost/fwd_per_sample"] == pytest.approx(fwd)
    assert cost["cost/jvp_per_sample"] == pytest.approx(jvp)
    assert cost["cost/sec_per_kimg"] > 0 and cost["cost/peak_mem_mb"] > 0


@pytest.mark.parametrize("method", METHODS.names())
@pytest.mark.parametrize("batch", [1000, 37])
def test_every_method_declares_the_passes_its_counter_measures(method, batch):
    """Each registered method's own accounting (Method.expected_passes) is what the counter measures, at a batch
    that splits evenly and one that does not (for a method that trains in groups, IMM, the largest batch below it
    that its groups divide; CMT's trajectories of `nfe` points likewise)."""
    defaults = METHODS.get(method).params().model_dump()
    group = defaults.get("group_size") or defaults.get("nfe") or 1
    batch -= batch % group
    trainer = one_step_trainer({"name": method}, batch)
    expected = trainer.method.expected_passes(batch)
    assert expected is not None, f"method {method!r} does not declare expected_passes"
    cost = trainer.cost()
    assert (cost["cost/fwd_per_sample"], cost["cost/jvp_per_sample"]) == pytest.approx(expected)


@pytest.mark.parametrize(
    "method", ["sdei", "stei", "sdee", "stee", "meanflow", "sct", "scd", "ict", "shortcut", "ayf_emd", "ayf_lmd"]
)
def test_every_target_of_the_other_methods_is_detached(method):
    """Paper B, MeanFlow, sCM, iCT and shortcut models detach everything but the student evaluation."""
    config, _ = resolve_trial_config({"method": {"name": method}, "model": {"width": 16, "depth": 2}})
    trainer = build_trainer(TrialConfig.parse(config), torch.device("cpu"), **frozen_priors(config))
    terms = trainer.method.terms(trainer.net, trainer.dataset.sample(256, trainer.gen), 10, trainer.gen)
    for term in terms:
        assert term.pred.requires_grad and not term.target.requires_grad, term.name
        assert term.target_norms().std() > 0
