"""Class conditioning and classifier-free guidance, against the closed-form velocities of a Gaussian mixture:
the conditional, unconditional and guided fields, guided sampling, class-conditional KL, label dropout, the
evaluation's labels and NFE counting, the conditional training of every method, and validation."""

import math

import pytest
import torch
from torch import nn

from orch.execution.build import build_network, build_section, build_trainer
from orch.methods.catalog import METHODS
from orch.methods.contracts.counting import CountingNet, Counts
from orch.methods.contracts.guidance import Condition, cfg_velocity
from orch.methods.contracts.interpolants import LinearInterpolant
from orch.methods.contracts.method import Setting
from orch.methods.contracts.metric_keys import eval_suffix
from orch.methods.data.images import ImageDataset
from orch.methods.data.toy2d import GaussianMixture, GMMParams
from orch.methods.evaluation.generation import EvalConfig, eval_labels, generate, sampler_calls
from orch.methods.evaluation.metric import metric
from orch.trial.config import resolve_trial_config, trial_id
from orch.trial.typed import TrialConfig
from tests.gaussian import ExactMixtureVelocity
from tests.trainers import frozen_priors

CPU = torch.device("cpu")


def conditional_gmm(**params) -> GaussianMixture:
    return GaussianMixture(GMMParams(conditional=True, **params))


def exact_velocity(data: GaussianMixture) -> ExactMixtureVelocity:
    return ExactMixtureVelocity(data.means, data.scale, data.std.double())


def fm(sampler: str = "euler"):
    data = conditional_gmm()
    setting = Setting(LinearInterpolant(data.std), None, float(data.std.mean()), num_classes=data.num_classes)
    return METHODS.get("fm").build(METHODS.get("fm").params(sampler=sampler), setting)


@pytest.mark.parametrize("conditional", [True, False])
def test_closed_form_mixture_velocity_is_the_conditional_expectation(conditional):
    """E[(x1 − x0 − v(I_τ))·g(I_τ)] = 0 for test functions g: v is E[x1 − x0 | I_τ] (given the class, or not)."""
    data = conditional_gmm(modes=4, radius=1.0, scale=0.3)
    v = exact_velocity(data)
    gen = torch.Generator().manual_seed(0)
    n = 400_000
    x1, labels = data.sample_labelled(n, gen)
    x0 = torch.randn(n, 2, generator=gen) * data.std
    for tau in (0.2, 0.5, 0.8):
        t = torch.full((n,), tau)
        x_t = ((1 - tau) * x0 + tau * x1).double()
        residual = (x1 - x0).double() - v(x_t, t, t, labels if conditional else None)
        for g in (torch.ones_like(x_t[:, :1]), x_t, x_t**2, x_t.prod(1, keepdim=True)):
            moments = residual[:, :, None] * g[:, None, :]  # every residual coordinate × every test function
            mean, stderr = moments.mean(0), moments.std(0) / math.sqrt(n)
            assert (mean.abs() < 5 * stderr + 1e-9).all(), (tau, mean, stderr)


def test_cfg_velocity_is_the_guided_combination_in_one_batched_pass():
    data = conditional_gmm()
    exact = exact_velocity(data)
    counts, condition = Counts(), Condition()
    net = CountingNet(exact, counts, condition)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(64, generator=gen, dtype=torch.float64)
    labels = torch.randint(8, (64,), generator=gen)
    condition.labels = labels
    omega = torch.rand(64, generator=gen, dtype=torch.float64) * 3
    guided = cfg_velocity(net, condition, 8, x, t, t, omega)
    v_cond, v_null = exact(x, t, t, labels), exact(x, t, t)
    torch.testing.assert_close(guided, v_null + omega[:, None] * (v_cond - v_null))
    assert counts.forwards == 2 * 64 and condition.labels is labels  # one pass of 2n rows; labels restored
    inside = cfg_velocity(net, condition, 8, x, t, t, 2.5, interval=(0.3, 0.7))
    in_interval = ((t >= 0.3) & (t <= 0.7))[:, None]
    torch.testing.assert_close(inside, torch.where(in_interval, v_null + 2.5 * (v_cond - v_null), v_cond))


def class_samples(data: GaussianMixture, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Exact samples of the given classes."""
    noise = torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(seed))
    return data.means.float()[labels] + data.scale * noise


def test_exact_conditional_flow_samples_the_class_densities():
    """ω = 1 with the exact conditional velocity: kl_cond as small as exact class samples' (finite-N floor);
    the same samples with shuffled labels are far off, and the marginal KL is as small as the data's."""
    data = conditional_gmm()
    evaluation = EvalConfig(num_samples=16000, nfe=[128], batch_size=16000, metrics=["kl", "kl_cond"])
    labels = eval_labels(data, evaluation.num_samples, seed=0)
    samples = generate(
        fm("heun"), exact_velocity(data), LinearInterpolant(data.std), data, evaluation, 128, 0, CPU, 1.0, labels
    )
    kl_cond = metric("kl_cond")
    floor = kl_cond(class_samples(data, labels, 5), data, evaluation, CPU, labels)
    ours = kl_cond(samples, data, evaluation, CPU, labels)
    assert abs(ours - floor) < 0.03 and floor < 0.6  # the floor: ~2000 samples per class over 2500 cells
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert kl_cond(samples, data, evaluation, CPU, shuffled) > 5 * floor
    kl = metric("kl")
    assert kl(samples, data, evaluation, CPU) < kl(class_samples(data, labels, 5), data, evaluation, CPU) + 0.02


def rk4_guided(exact: ExactMixtureVelocity, x: torch.Tensor, labels: torch.Tensor, omega: float, steps: int):
    """The guided flow ẋ = v_∅ + ω(v_y − v_∅) from τ = 0 to 1 by classical RK4, written out independently."""

    def field(x, tau):
        t = torch.full((len(x),), tau, dtype=torch.float64)
        v, log_p = exact.class_velocities(x, t)
        v_null = (torch.softmax(log_p, 1)[..., None] * v).sum(1)
        return v_null + omega * (v[torch.arange(len(x)), labels] - v_null)

    h = 1 / steps
    for k in range(steps):
        tau = k * h
        k1 = field(x, tau)
        k2 = field(x + h / 2 * k1, tau + h / 2)
        k3 = field(x + h / 2 * k2, tau + h / 2)
        k4 = field(x + h * k3, tau + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@pytest.mark.parametrize("omega", [1.0, 2.0, 4.0])
def test_guided_sampler_with_the_exact_velocity_integrates_the_guided_flow(omega):
    data = conditional_gmm()
    exact = exact_velocity(data)
    evaluation = EvalConfig(num_samples=500, nfe=[512], batch_size=500)
    labels = eval_labels(data, 500, seed=3)
    nfe = 512 if omega == 1 else 1024  # two-pass guidance: two evaluations per Heun evaluation
    ours = generate(
        fm("heun"), exact, LinearInterpolant(data.std.double()), data, evaluation, nfe, 3, CPU, omega, labels
    )
    x0 = LinearInterpolant(data.std.double()).sample_base(500, (2,), torch.Generator().manual_seed(3 + 1_000_003))
    reference = rk4_guided(exact, x0, labels, omega, 400)
    assert (ours - reference).abs().max() < 2e-3


def test_guidance_concentrates_samples_on_their_class():
    """Higher ω raises the class posterior p(y | x) of the samples (and lowers diversity): what CFG is for."""
    data = conditional_gmm(scale=0.2)
    exact = exact_velocity(data)
    evaluation = EvalConfig(num_samples=4000, nfe=[64], batch_size=4000)
    labels = eval_labels(data, 4000, seed=0)
    interpolant = LinearInterpolant(data.std)
    posterior = []
    for omega in (1.0, 3.0):
        x = generate(fm(), exact, interpolant, data, evaluation, 64, 0, CPU, omega, labels)
        _, log_p = exact.class_velocities(x, torch.ones(len(x)))
        posterior.append(torch.softmax(log_p, 1)[torch.arange(len(x)), labels].mean().item())
    assert posterior[1] > posterior[0] + 0.02, posterior


def test_nfe_counts_guided_evaluations():
    """NFE = counted network evaluations: two-pass CFG at N steps is 2N; inside a guidance interval only."""
    method = fm()
    assert sampler_calls(method, 4, 1.0, None, 8) == 4
    assert sampler_calls(method, 4, 2.0, None, 8) == 2
    assert sampler_calls(method, 3, 2.0, None, 8) is None  # odd: unreachable
    assert sampler_calls(method, 3, 2.0, (0.5, 1.0), 8) == 2  # τ = 0 unguided (1) + τ = 0.5 guided (2)
    data, counts = conditional_gmm(), []

    class Counted(nn.Module):
        def forward(self, x, a, b, labels=None, omega=None):
            counts.append(len(x))
            return torch.zeros_like(x)

    evaluation = EvalConfig(num_samples=10, batch_size=10, nfe=[6])
    generate(method, Counted(), LinearInterpolant(data.std), data, evaluation, 6, 0, CPU, 1.5, eval_labels(data, 10, 0))
    assert sum(counts) / 10 == 6
    assert (
        eval_suffix(6, 1.5) == "nfe_6/cfg_1.5"
        and eval_suffix(6, 2.0) == "nfe_6/cfg_2"
        and eval_suffix(6, 1.0) == "nfe_6"
    )


def trainer_for(method: dict, batch: int = 64, dataset: dict | None = None, **train):
    config, problems = resolve_trial_config(
        {
            "dataset": dataset or {"name": "gmm", "conditional": True},
            "method": method,
            "model": {"width": 32, "depth": 2},
            "train": {"batch_size": batch, **train},
            "eval": {"nfe": [2], "metrics": ["kl", "kl_cond"]},
        }
    )
    assert not problems, problems
    return build_trainer(TrialConfig.parse(config), CPU, **frozen_priors(config))


def test_label_dropout_rate_and_online_cfg_keeps_every_label():
    x1, labels = trainer_for({"name": "fm"}, batch=200_000, label_dropout=0.1).draw_batch()
    dropped = (labels == 8).double().mean().item()
    assert abs(dropped - 0.1) < 4 * math.sqrt(0.09 / 200_000)
    _, labels = trainer_for({"name": "sdei", "online_cfg": [1.0, 2.5]}, batch=10_000).draw_batch()
    assert (labels < 8).all()


def test_evaluation_labels_follow_class_frequencies_with_a_fixed_seed():
    labels = torch.tensor([0] * 700 + [1] * 200 + [2] * 100)
    data = ImageDataset(torch.zeros(1000, 1, 2, 2, dtype=torch.uint8), {}, False, 0.5, labels, ["a", "b", "c"])
    drawn = eval_labels(data, 50_000, seed=4)
    torch.testing.assert_close(drawn, eval_labels(data, 50_000, seed=4))
    shares = torch.bincount(drawn, minlength=3).double() / 50_000
    assert torch.allclose(shares, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), atol=0.01)
    assert not torch.equal(drawn, eval_labels(data, 50_000, seed=5))


GUIDED_COSTS = [  # (method, options that guide in training) → (forward, JVP) evaluations per sample
    ("sdei", {"online_cfg": [1.0, 2.5]}, 4.0, 0.0),  # estimator + guided teacher (2) + student: 3F + 1 CFG pass
    ("sdee", {"online_cfg": [1.0, 2.5]}, 4.0, 0.0),
    ("stei", {"online_cfg": [1.0, 2.5], "target": "teacher"}, 5.0, 0.0),  # + the diffusion term
    ("meanflow", {"cfg_omega": 1.5, "cfg_kappa": 0.3}, 3.0, 1.0),  # + the batched cond/null diagonal
    ("scd", {"teacher_guidance": 2.0}, 3.0, 1.0),  # the teacher's velocity is two-pass guided
    ("imf", {"online_cfg": [1.0, 8.0]}, 3.0, 1.0),  # student + batched (y, ω) / (∅, 1) diagonal; the JVP
    ("imf", {"online_cfg": [1.0, 8.0], "online_interval": True}, 3.0, 1.0),  # the interval costs no pass
    ("tvm", {"guidance": 2.0}, 3.0, 1.0),  # JVP in b, EMA at the landing point, FM, EMA's unconditional velocity
    ("tim", {"cfg_omega": 1.5, "cfg_kappa": 0.5}, 4.0, 0.0),  # student, DDE's 2 passes on half, EMA cond/null
    ("alpha_flow", {"cfg_omega": 1.5}, 3.5, 0.0),  # student, α-target pass on half, cond/null (α = 1 early on)
    ("fmm_lmd", {"teacher_guidance": 2.0}, 2.0, 1.0),  # JVP along b with grad, the guided teacher at the landing point
    ("fmm_emd", {"teacher_guidance": 2.0}, 2.0, 2.0),  # the guided b̂, the JVPs along a and along b̂
    ("ayf_emd", {"teacher_guidance": 2.0}, 3.0, 1.0),  # the student, the guided b̂, the no-grad JVP
    ("ayf_lmd", {"teacher_guidance": 2.0}, 3.0, 1.0),  # the student, the no-grad JVP, the guided b̂ there
    ("dmf", {"cfg_kappa": 0.6, "cfg_interval": [0.3, 1.0]}, 6.0, 1.0),  # + each branch's cond/null diagonal
    ("dmf", {"target": "distill", "teacher_guidance": 2.0}, 6.0, 1.0),  # + each branch's guided teacher (2 F)
    ("ayf_emd", {"autoguide": {"weight": 2.0}}, 3.0, 1.0),  # the student, the teacher and its weak guide, the JVP
    ("ayf_emd", {"autoguide": {"weight": 2.0, "model": {"width": 8}}}, 3.0, 1.0),  # a smaller weak teacher
]
"""The papers' accounting of guided training, checked against the counter and against each method's own."""


def trains_conditionally_with_counted_passes(method: dict) -> dict[str, float]:
    """Three conditional steps, then guided and unguided evaluation; returns the measured cost, which equals the
    method's own declared passes."""
    trainer = trainer_for(method, batch=64)
    for _ in range(3):
        stats = trainer.train_step(with_stats=True)
    assert math.isfinite(stats["train/loss"])
    cost = trainer.cost()
    declared = trainer.method.expected_passes(64)
    assert (cost["cost/fwd_per_sample"], cost["cost/jvp_per_sample"]) == pytest.approx(declared)
    nfe = next(n for n in (2, 4, 6) if sampler_calls(trainer.method, n, 1.5, None, 8) is not None)  # two-pass
    evaluation = EvalConfig(num_samples=200, nfe=[nfe], metrics=["kl", "kl_cond"], guidance=[1.0, 1.5])
    scores, _ = trainer.evaluate(evaluation)
    keys = {f"eval/{m}/{s}" for m in ("kl", "kl_cond") for s in (f"nfe_{nfe}", f"nfe_{nfe}/cfg_1.5")}
    assert set(scores) == keys and all(math.isfinite(v) for v in scores.values())
    return cost


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains_conditionally_with_counted_passes(name):
    trains_conditionally_with_counted_passes({"name": name})


@pytest.mark.parametrize("name, options, fwd, jvp", GUIDED_COSTS, ids=[c[0] for c in GUIDED_COSTS])
def test_guided_training_counts_its_guidance_passes(name, options, fwd, jvp):
    cost = trains_conditionally_with_counted_passes({"name": name, **options})
    assert cost["cost/fwd_per_sample"] == pytest.approx(fwd) and cost["cost/jvp_per_sample"] == pytest.approx(jvp)


def test_a_student_with_the_interval_as_input_samples_at_the_interval_it_is_given():
    """iMF with online_interval, trained a few steps: sampling without an interval is sampling over [0, 1] (the
    same scores, bit for bit), a narrower eval.guidance_interval changes them, at one evaluation per step."""
    trainer = trainer_for({"name": "imf", "online_cfg": [1.0, 8.0], "online_interval": True}, batch=64)
    for _ in range(3):
        trainer.train_step()
    scores = {}
    for interval in (None, [0.0, 1.0], [0.3, 0.6]):
        evaluation = EvalConfig(num_samples=500, nfe=[1], metrics=["kl"], guidance=[4.0], guidance_interval=interval)
        scores[str(interval)], _ = trainer.evaluate(evaluation)
    assert scores["None"] == scores["[0.0, 1.0]"]
    assert scores["None"]["eval/kl/nfe_1/cfg_4"] != scores["[0.3, 0.6]"]["eval/kl/nfe_1/cfg_4"]


def test_conditioning_changes_the_network_only_by_its_class_embedding():
    """A conditional network's other weights start where the unconditional one's do (same seed), and the
    labels, the null class included, change its output."""
    base, _ = resolve_trial_config({"dataset": {"name": "gmm"}})
    cond, _ = resolve_trial_config({"dataset": {"name": "gmm", "conditional": True}})
    plain, conditional = (
        build_network(TrialConfig.parse(base)).state_dict(),
        build_network(TrialConfig.parse(cond)).state_dict(),
    )
    assert set(conditional) - set(plain) == {"classes.labels.weight"}
    assert all(torch.equal(plain[k], conditional[k]) for k in plain)
    net = build_network(TrialConfig.parse(cond))
    x, t = torch.randn(4, 2), torch.rand(4)
    outputs = [net(x, t, t, labels=torch.full((4,), k)) for k in (0, 1, 8)]
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[0], outputs[2])
    with pytest.raises(ValueError, match="without class conditioning"):
        build_network(TrialConfig.parse(base))(x, t, t, labels=torch.zeros(4, dtype=torch.long))


def test_unconditional_trials_keep_their_ids():
    """The new options at their inert values (and label dropout without labels) leave a trial's id alone."""
    base = {"dataset": {"name": "gmm"}, "method": {"name": "meanflow"}}
    plain = trial_id(resolve_trial_config(base)[0])
    inert = {
        "dataset": {"name": "gmm", "conditional": False},
        "method": {"name": "meanflow", "cfg_omega": 1.0, "cfg_kappa": 0.0},
        "train": {"label_dropout": 0.3},
        "eval": {"guidance": [1.0]},
    }
    assert trial_id(resolve_trial_config(inert)[0]) == plain
    conditional = resolve_trial_config({**base, "dataset": {"name": "gmm", "conditional": True}})[0]
    assert trial_id(conditional) != plain
    other_dropout = resolve_trial_config(
        {**base, "dataset": {"name": "gmm", "conditional": True}, "train": {"label_dropout": 0.2}}
    )[0]
    assert trial_id(other_dropout) != trial_id(conditional)


@pytest.mark.parametrize(
    "raw, path, message",
    [
        ({"dataset": {"name": "checkerboard", "conditional": True}}, "dataset.conditional", "has no class labels"),
        ({"eval": {"guidance": [1.0, 2.0]}}, "eval.guidance", "set dataset.conditional"),
        ({"eval": {"metrics": ["kl_cond"]}}, "eval.metrics.0", "class-conditional"),
        (
            {"dataset": {"name": "gmm", "conditional": True}, "eval": {"nfe": [1, 2], "guidance": [2.0]}},
            "eval.nfe",
            "not reachable",
        ),
        (
            {
                "dataset": {"name": "gmm", "conditional": True},
                "method": {"name": "sdei", "online_cfg": [1.0, 2.5]},
                "eval": {"guidance": [3.0]},
            },
            "eval.guidance",
            "outside method.online_cfg",
        ),
        (
            {"dataset": {"name": "gmm", "conditional": True}, "method": {"name": "sdei", "online_cfg": [2.5, 1.0]}},
            "method.online_cfg",
            "not an interval",
        ),
        (
            {"dataset": {"name": "gmm", "conditional": True}, "method": {"name": "stei", "online_cfg": [1.0, 2.0]}},
            "method.online_cfg",
            "target: teacher",
        ),
        ({"method": {"name": "meanflow", "cfg_kappa": 0.5}}, "method.cfg_kappa", "set dataset.conditional"),
    ],
)
def test_invalid_guidance_settings_are_validation_errors(raw, path, message):
    raw = {"dataset": {"name": "gmm"}, **raw}
    _, problems = resolve_trial_config(raw)
    assert any(p.path == path and message in p.message for p in problems), problems


def test_image_datasets_yield_their_labels(tmp_path):
    from PIL import Image

    for k, name in enumerate(["cat", "dog", "owl"]):
        (tmp_path / name).mkdir()
        for i in range(k + 1):
            Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(tmp_path / name / f"{i}.png")
    data = build_section(
        {"dataset": {"name": "image_folder", "root": str(tmp_path), "resolution": 8, "conditional": True}}, "dataset"
    )
    assert data.classes == ["cat", "dog", "owl"] and data.identity["classes"] == data.classes
    assert torch.bincount(data.labels).tolist() == [1, 2, 3]
    assert (data.images[:, 0, 0, 0] == 40 * data.labels).all()  # each image carries its own folder's class
    x, labels = data.sample_labelled(32, torch.Generator().manual_seed(0))
    assert ((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist() == (40 * labels).tolist()
    plain = build_section({"dataset": {"name": "image_folder", "root": str(tmp_path), "resolution": 8}}, "dataset")
    assert plain.num_classes is None
