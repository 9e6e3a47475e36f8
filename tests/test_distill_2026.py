"""Flow-map distillation from a frozen teacher (FMM-LMD/EMD, AYF-EMD/LMD) pinned on the exact Gaussian flow.

With the exact teacher velocity b* the exact flow map is a fixed point: every residual and the gradient of every
loss vanish there, for each stop-gradient placement. Each check has a control that must fail it by a wide margin.
"""

import copy
import math

import numpy as np
import pytest
import scipy.special
import torch
import yaml
from torch import Tensor, nn

from orch.cli import main
from orch.execution.build import build_network, build_trainer
from orch.execution.teachers import named_file_problems, planned_guide, teacher_config
from orch.methods.contracts.conventions import canonical_to_edm, edm_to_canonical
from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.flow_map import jump
from orch.methods.contracts.interpolants import LinearInterpolant, expand_time
from orch.methods.contracts.method import Setting
from orch.methods.contracts.teacher import AutoguideSpec
from orch.methods.losses.ayf import AYFEMD, AYFEMDParams, TangentNorm, ayf_emd_term, ayf_lmd_term
from orch.methods.losses.cmt import CMTMethod, CMTParams, solve, solver_times
from orch.methods.losses.dmf import DMF, DMFParams
from orch.methods.losses.ect import ECT, ECTParams, ect_sigma_r
from orch.methods.losses.self_distillation import esd_term, lsd_term
from orch.methods.losses.tcm import TCMMethod, TCMParams, truncated_student_t
from orch.methods.networks.mlp import FlowMapMLP
from orch.study.load import load_study
from orch.trial.config import resolve_trial_config
from orch.trial.typed import TrialConfig
from tests.conftest import STUDIES
from tests.gaussian import ExactGaussianFlowMap, gaussian_2d
from tests.test_methods_2026 import marginal_points
from tests.trainers import trainer_for

D = torch.float64


class GaussianFamily(ExactGaussianFlowMap):
    """The exact map as a network with parameters θ = (m, log s) per coordinate: exact at θ*, wrong elsewhere."""

    def __init__(self, exact: ExactGaussianFlowMap, std_factor: float = 1.0):
        nn.Module.__init__(self)
        self.sigma0 = exact.sigma0
        self.mean = nn.Parameter(exact.mean.clone())
        self.log_std = nn.Parameter((exact.std * std_factor).log())

    @property
    def std(self):
        return self.log_std.exp()


def teacher_of(exact: ExactGaussianFlowMap):
    """b*(x, t): the exact velocity, the teacher of every distillation below."""
    return lambda x, t: exact(x, t, t)


def residual_and_gradient(term, params: list[nn.Parameter]) -> tuple[float, float]:
    """max |pred − target| and the norm of the gradient of Σ(pred − target)² with respect to `params`."""
    grads = torch.autograd.grad(((term.pred - term.target) ** 2).sum(), params)
    return (term.pred - term.target).abs().max().item(), torch.cat([g.flatten() for g in grads]).norm().item()


TERMS = {
    "fmm_lmd convex": lambda net, x, a, b, v: lsd_term(net, x, a, b, "convex", v),
    "fmm_lmd none": lambda net, x, a, b, v: lsd_term(net, x, a, b, "none", v),
    "fmm_emd full": lambda net, x, a, b, v: esd_term(net, x, a, b, "full", v),
    "fmm_emd none": lambda net, x, a, b, v: esd_term(net, x, a, b, "none", v),
    "ayf_emd": lambda net, x, a, b, v: ayf_emd_term(net, x, a, b, v, 1.0, TangentNorm(0.1, 1.0, False)),
    "ayf_lmd": lambda net, x, a, b, v: ayf_lmd_term(net, x, a, b, v, TangentNorm(0.1, 1.0, False)),
}


@pytest.mark.parametrize("name", list(TERMS))
def test_the_exact_map_is_a_fixed_point_of_each_distillation_loss(name):
    """Residual ≤ 1e-10 and zero gradient at θ* with the exact teacher; a student off by 20% in s is not."""
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(0)
    x, a, b = marginal_points(exact, 1024, gen)
    for factor, exact_point in ((1.0, True), (1.2, False)):
        student = GaussianFamily(exact, factor)
        term = TERMS[name](CountingNet(student), x, a, b, teacher_of(exact))
        residual, grad = residual_and_gradient(term, list(student.parameters()))
        if exact_point:
            assert residual < 1e-10 and grad < 1e-9, (residual, grad)
        else:
            assert residual > 1e-2 and grad > 1e-3, (residual, grad)


def test_lmd_measures_the_teacher_at_the_landing_point_and_emd_advects_along_it():
    """Controls of the two FMM residuals at the exact map: the teacher at I_a instead of X_{a,b}(I_a) (LMD), and
    the advection with the wrong sign (EMD), each leave a residual > 1e-2."""
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(1)
    x, a, b = marginal_points(exact, 1024, gen)
    net = CountingNet(exact)
    at_start = lsd_term(net, x, a, b, "convex", lambda _, t: exact(x, t, t))
    assert (at_start.pred - at_start.target).abs().max() > 1e-2
    flipped = esd_term(net, x, a, b, "full", lambda y, t: -exact(y, t, t))
    assert (flipped.pred - flipped.target).abs().max() > 1e-2


def test_ayf_tangent_is_the_eulerian_residual_along_the_teacher_and_is_normalised():
    """AYF-EMD's g is zero at the exact map only with the teacher's velocity and the right sign of (b − a): the
    conditional velocity x1 − x0 (self-training) leaves it non-zero per sample, and so does a flipped sign of the
    (b − a) term; r < 1 leaves a bias that vanishes as r → 1. ĝ = g/(‖g‖ + c) has norm < 1."""
    exact, gen = gaussian_2d(), torch.Generator().manual_seed(2)
    x, a, b = marginal_points(exact, 1024, gen)
    net, norm = CountingNet(exact), TangentNorm(0.1, 1.0, False)
    x0 = torch.randn(1024, 2, generator=gen, dtype=D) * exact.sigma0  # a pair consistent with x: x1 from I_a
    x1 = (x - expand_time(1 - a, x) * x0) / expand_time(a, x)
    conditional = ayf_emd_term(net, x, a, b, lambda *_: x1 - x0, 1.0, norm)
    assert (conditional.target - conditional.pred).abs().max() > 1e-2

    def residual(r, norm=norm):
        term = ayf_emd_term(net, x, a, b, teacher_of(exact), r, norm)
        return (term.target - term.pred).flatten(1).norm(dim=1)

    assert residual(1.0).max() < 1e-10 and residual(-1.0).max() > 1e-2  # r = −1: the (b − a) term's sign flipped
    plain = TangentNorm(0.1, 0.0, False)  # p = 0: g itself, which is (1 − r)·(b − a)·d/da v at the exact map
    biases = [residual(r, plain).max().item() for r in (0.9, 0.99, 0.999)]
    assert biases[0] / biases[1] == pytest.approx(10) and biases[1] / biases[2] == pytest.approx(10)
    g = torch.randn(16, 2, 8, 8, generator=gen, dtype=D) * 100
    assert (TangentNorm(0.1, 1.0, False)(g).flatten(1).norm(dim=1) < 1).all()
    spatial = TangentNorm(0.1, 1.0, True)(g).flatten(1).norm(dim=1)
    torch.testing.assert_close(spatial, torch.full_like(spatial, 128**0.5), rtol=1e-2, atol=0)  # ‖g‖/(‖g‖/√D + c)


def test_ayf_warms_the_derivative_term_up_over_a_fraction_of_training():
    method = AYFEMD(AYFEMDParams(warmup=0.25), Setting(LinearInterpolant(torch.ones(2)), None, 1.0, steps=1000))
    assert method.r(0) == 0.0 and method.r(125) == pytest.approx(0.495) and method.r(250) == method.r(999) == 0.99
    method = AYFEMD(AYFEMDParams(warmup=0.0, r_max=1.0), Setting(LinearInterpolant(torch.ones(2)), None, 1.0))
    assert method.r(0) == 1.0


class GuidedGaussianFlowMap(nn.Module):
    """The exact flow map of the autoguided velocity b_w + λ(b_s − b_w) between two Gaussian teachers with the
    same mean: the std of I_τ follows A_G = A_w·(A_s/A_w)^λ (each velocity is d/dτ log A along x − τm), so
    X_{a,b}(x) = b·m + (A_G(b)/A_G(a))(x − a·m). For jumps a < b only."""

    def __init__(self, strong: ExactGaussianFlowMap, weak: ExactGaussianFlowMap, weight: float):
        super().__init__()
        self.strong, self.weak, self.weight = strong, weak, weight

    def scale(self, t: Tensor) -> Tensor:
        s, w = self.strong.sigma(t), self.weak.sigma(t)
        return w * (s / w) ** self.weight

    def forward(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        m, a, b = self.strong.mean, a[:, None], b[:, None]
        jump = b * m + self.scale(b) / self.scale(a) * (x - a * m)
        return (jump - x) / (b - a)


def autoguided(strong, weak, weight: float) -> AYFEMD:
    params = AYFEMDParams(autoguide=AutoguideSpec(weight=weight), r_max=1.0, warmup=0.0)
    setting = Setting(LinearInterpolant(strong.sigma0), None, 1.0, teacher=CountingNet(strong), guide=CountingNet(weak))
    return AYFEMD(params, setting)


def test_the_autoguided_teacher_samples_with_the_closed_form_std():
    """Strong N(m, s²), weak N(m, s_w²), λ: the guided flow carries N(0, σ0²) to N(m, (s·(s/s_w)^(λ−1))²) —
    sharper than the strong teacher (checked by RK4 in fp64 on the affine flow); with the roles swapped it is
    wider than s. The teacher's passes: 2 per b̂."""
    strong = gaussian_2d()
    weak = ExactGaussianFlowMap(strong.sigma0, strong.mean, 1.5 * strong.std)
    for (s_net, w_net), sharper in (((strong, weak), True), ((weak, strong), False)):
        velocity = autoguided(s_net, w_net, 2.0).teacher()
        x = torch.stack([torch.zeros(2, dtype=D), strong.sigma0])  # two starts: the affine map's offset and slope
        n = 2000
        for k in range(n):  # RK4 from τ = 0 to 1
            t = torch.full((2,), k / n, dtype=D)
            k1 = velocity(x, t)
            k2 = velocity(x + k1 / (2 * n), t + 1 / (2 * n))
            k3 = velocity(x + k2 / (2 * n), t + 1 / (2 * n))
            k4 = velocity(x + k3 / n, t + 1 / n)
            x = x + (k1 + 2 * k2 + 2 * k3 + k4) / (6 * n)
        std, s, s_w = x[1] - x[0], s_net.std, w_net.std
        torch.testing.assert_close(x[0], strong.mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(std, s * (s / s_w), rtol=1e-9, atol=1e-9)  # λ − 1 = 1
        assert (std < s).all() if sharper else (std > s).all()
    assert autoguided(strong, weak, 2.0).teacher_passes() == 2


@pytest.mark.parametrize("name", ["ayf_emd", "fmm_lmd", "fmm_emd"])
def test_distilling_the_autoguided_teacher_has_the_guided_flow_map_as_fixed_point(name):
    """The students distil the guided flow, not the strong teacher's: at its exact map every residual vanishes;
    at the strong teacher's own map (control) it does not."""
    strong = gaussian_2d()
    weak = ExactGaussianFlowMap(strong.sigma0, strong.mean, 1.5 * strong.std)
    velocity = autoguided(strong, weak, 2.0).teacher()
    gen = torch.Generator().manual_seed(4)
    x, a, b = marginal_points(strong, 1024, gen)
    keep = b - a > 0.02  # the guided map's velocity is a difference quotient: jumps of a useful length
    x, a, b = x[keep], a[keep], b[keep]
    for student, exact_point in ((GuidedGaussianFlowMap(strong, weak, 2.0), True), (strong, False)):
        term = TERMS[{"ayf_emd": "ayf_emd", "fmm_lmd": "fmm_lmd convex", "fmm_emd": "fmm_emd full"}[name]](
            CountingNet(student), x, a, b, velocity
        )
        residual = (term.pred - term.target).abs().max().item()
        assert residual < 1e-8 if exact_point else residual > 1e-2, residual


def test_autoguidance_options_are_checked_before_anything_runs(tmp_path, capsys):
    """autoguide with teacher_guidance exits 2 at validation; a named weak teacher that does not exist exits 2 at
    submit, naming the option, and creates nothing."""
    study = {
        "name": "autoguided",
        "base": {"method": {"name": "ayf_emd", "autoguide": {"weight": 2.0}, "teacher_guidance": 2.0}},
    }
    path = tmp_path / "autoguided.yaml"
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(SystemExit) as exited:
        main(["validate", str(path)])
    assert exited.value.code == 2 and "set one of them" in capsys.readouterr().err
    study["base"]["method"] = {"name": "ayf_emd", "autoguide": {"path": str(tmp_path / "weak.pt")}}
    path.write_text(yaml.safe_dump(study))
    assert main(["submit", str(path), "--workdir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "method.autoguide.path" in err and "Traceback" not in err and not (tmp_path / "runs").exists()


def test_ect_shrinks_delta_sigma_by_q_per_stage_and_ends_at_the_data():
    """σ_r = max(0, σ_t(1 − q^{−(k+1)}(1 + κ·sigmoid(−βσ_t)))): with κ = 0, Δσ/σ_t = q^{−(k+1)} at every σ; with
    ECT's κ = 8 the first stage regresses small σ onto the data itself (σ_r = 0)."""
    sigma = torch.logspace(-2, 2, 50, dtype=D)
    for stage in range(4):
        shrink = (sigma - ect_sigma_r(sigma, stage, 4.0, 0.0, 1.0)) / sigma
        torch.testing.assert_close(shrink, torch.full_like(sigma, 4.0 ** -(stage + 1)))
    first = ect_sigma_r(sigma, 0, 2.0, 8.0, 1.0)
    assert (first[sigma < 1.9] == 0).all() and (first[sigma > 2.0] > 0).all()
    expected = sigma * (1 - 0.25 * (1 + 8 * torch.sigmoid(-sigma)))  # stage 1, q = 2, written out
    torch.testing.assert_close(ect_sigma_r(sigma, 1, 2.0, 8.0, 1.0), expected.clamp(min=0))


def ect_residual(student, stage: int, independent_noise: bool = False) -> tuple[float, float]:
    """Mean |f(σ_t) − f(σ_r)| of ECT's term for a Gaussian-family student at this stage (q = 2, κ = 0), and the
    norm of the gradient of the mean squared residual; or both with fresh noise for the target pass (control)."""
    exact = gaussian_2d()
    method = ECT(ECTParams(q=2.0, kappa=0.0, stage_steps=1), Setting(LinearInterpolant(exact.sigma0), None, 1.0))
    x1 = exact.mean + exact.std * torch.randn(1 << 16, 2, generator=torch.Generator().manual_seed(5), dtype=D)
    gen = torch.Generator().manual_seed(6)
    (term,) = method.terms(CountingNet(student), x1, stage, gen)
    target = term.target
    if independent_noise:
        x0 = torch.randn(x1.shape, generator=gen, dtype=D) * exact.sigma0
        sigma_r = ect_sigma_r(canonical_to_edm(term.a, 1.0), stage, 2.0, 0.0, 1.0)
        tau_r = edm_to_canonical(sigma_r, 1.0)
        target = jump(CountingNet(student), (1 - tau_r[:, None]) * x0 + tau_r[:, None] * x1, tau_r, term.b).detach()
    grads = torch.autograd.grad(((term.pred - target) ** 2).sum(1).mean(), list(student.parameters()))
    return (term.pred - target).abs().mean().item(), torch.cat([g.flatten() for g in grads]).norm().item()


def test_ect_pairs_share_their_noise_so_the_residual_shrinks_with_delta_sigma():
    """At the exact consistency function, ECT's residual shrinks with Δσ/σ = 2^{−(k+1)} (slope 1 on log-log: the
    pairs lie on one noising line with the same ε) and its gradient faster, while a student 20% off in s keeps a
    gradient; with fresh noise for the target (control) nothing shrinks. The data end is exact: where σ_r = 0 the
    target is x1."""
    exact = gaussian_2d()
    residuals = [ect_residual(GaussianFamily(exact), stage) for stage in (3, 7)]
    assert residuals[0][0] / residuals[1][0] == pytest.approx(16, rel=0.1)  # Δσ 16× smaller
    assert residuals[0][1] / residuals[1][1] > 8
    assert ect_residual(GaussianFamily(exact, 1.2), 7)[1] > 10 * residuals[1][1]  # off θ*, the gradient stays
    controls = [ect_residual(GaussianFamily(exact), stage, independent_noise=True) for stage in (3, 7)]
    assert controls[1][0] > 0.5 * controls[0][0] > 10 * residuals[1][0]
    method = ECT(ECTParams(), Setting(LinearInterpolant(exact.sigma0), None, 1.0))
    x1 = torch.randn(4096, 2, generator=torch.Generator().manual_seed(7), dtype=D)
    (term,) = method.terms(CountingNet(exact), x1, 0, torch.Generator().manual_seed(8))
    at_data = ect_sigma_r(canonical_to_edm(term.a, 1.0), 0, 2.0, 8.0, 1.0) == 0
    assert 0.2 < at_data.double().mean() < 0.9
    torch.testing.assert_close(term.target[at_data], x1[at_data])


def test_dmf_trains_flow_matching_and_the_meanflow_target_on_every_sample_with_its_time_laws():
    """Two terms of the whole batch: flow matching at logit-normal(0) times on the diagonal, MeanFlow's target on
    jumps a ≤ b whose ends come from logit-normal(0.4) and (−1.2) draws (MeanFlow's time: the noisier end is
    the max), each with the adaptive weight; 2 forwards and 1 JVP per sample."""
    method = DMF(DMFParams(), Setting(LinearInterpolant(torch.ones(2)), None, 1.0))
    net, n = CountingNet(FlowMapMLP(2, 16, 2, torch.ones(2))), 1 << 16
    x1 = torch.randn(n, 2, generator=torch.Generator().manual_seed(9))
    fm, mf = method.terms(net, x1, 0, torch.Generator().manual_seed(10))
    logit = lambda tau: torch.log((1 - tau) / tau)  # noqa: E731 — MeanFlow's t = 1 − τ before the sigmoid
    assert torch.equal(fm.a, fm.b) and logit(fm.a).mean().item() == pytest.approx(0.0, abs=0.02)
    assert (mf.a <= mf.b).all() and (mf.a < mf.b).float().mean() > 0.99
    assert (logit(mf.a) + logit(mf.b)).mean().item() == pytest.approx(0.4 - 1.2, abs=0.03)  # max + min = sum
    assert logit(mf.a).mean().item() > 0.4 and logit(mf.b).mean().item() < -1.2  # the max above both, min below
    assert fm.distance.kind == mf.distance.kind == "adaptive"
    assert net.forwards == 2 * n and net.jvps == n


def solver_error(exact: ExactGaussianFlowMap, m: int, first_order: bool = False) -> float:
    """Relative error of CMT's teacher solver (or of its first-order step alone: the control) after m steps from
    σ = 80 to 0.002 against the exact flow map of the same start points."""
    taus, gen = solver_times(m, 80.0, 0.002, 1.0), torch.Generator().manual_seed(3)
    x, a, _ = marginal_points(exact, 4096, gen, a=taus[0], b=1.0)
    velocity = teacher_of(exact)
    if first_order:  # DDIM, which on this path is Euler: x ← x + (s − t)·b̂(x, t)
        end = x
        for t, s in zip(taus[:-1], taus[1:]):
            end = end + (s - t) * velocity(end, torch.full((len(x),), t, dtype=D))
    else:
        end = solve(velocity, x, taus)[-1]
    expected = exact.exact_jump(x, a, torch.full_like(a, taus[-1]))
    return ((end - expected).norm() / expected.norm()).item()


def test_cmt_solver_is_second_order_and_its_first_order_step_is_not():
    """DPM-Solver++(2M) on the exact teacher: the error falls 4× per doubling of the steps and is under 2% at CMT's
    16 (measured 1.7% on this fixture); its first-order step alone (control) falls 2× and is 7× worse at 16."""
    exact = gaussian_2d()
    errors = [solver_error(exact, m) for m in (16, 32, 64, 128)]
    assert errors[0] < 0.02 and errors[2] / errors[3] == pytest.approx(4, rel=0.1)
    controls = [solver_error(exact, m, first_order=True) for m in (16, 32)]
    assert controls[0] / controls[1] == pytest.approx(2, rel=0.15) and controls[0] > 5 * errors[0]


def cmt_term(student: nn.Module, permuted: bool = False):
    """CMT's term for `student` with the exact teacher (M = 16, 128 trajectories); targets permuted across
    trajectories for the control."""
    exact = gaussian_2d()
    setting = Setting(LinearInterpolant(exact.sigma0), None, 1.0, CountingNet(exact))
    method = CMTMethod(CMTParams(nfe=16, distance="squared"), setting)
    x1 = exact.mean + exact.std * torch.randn(2048, 2, generator=torch.Generator().manual_seed(4), dtype=D)
    (term,) = method.terms(CountingNet(student), x1, 0, torch.Generator().manual_seed(5))
    if permuted:
        term.target = term.target.reshape(128, 16, 2)[torch.randperm(128, generator=torch.Generator().manual_seed(6))]
        term.target = term.target.reshape(2048, 2)
    return term


def test_cmt_maps_every_trajectory_point_to_its_end_and_the_exact_map_fits_them():
    """The rows of a trajectory are its 16 solver points, at the solver's times, with one shared target; the exact
    flow map to data meets them up to the solver's error (mean residual 0.017 measured, gradient 6.5× below a
    student 20% off in s). Targets permuted across trajectories (control) miss by > 0.5."""
    exact = gaussian_2d()
    student, off_student = GaussianFamily(exact), GaussianFamily(exact, 1.2)
    term = cmt_term(student)
    taus = torch.tensor(solver_times(16, 80.0, 0.002, 1.0)[:16], dtype=D)
    torch.testing.assert_close(term.a.reshape(128, 16), taus.expand(128, 16))
    assert (term.target.reshape(128, 16, 2) == term.target.reshape(128, 16, 2)[:, :1]).all()
    _, gradient = residual_and_gradient(term, list(student.parameters()))
    assert (term.pred - term.target).abs().mean() < 0.025
    off = cmt_term(off_student)
    assert residual_and_gradient(off, list(off_student.parameters()))[1] > 5 * gradient
    control = cmt_term(GaussianFamily(exact), permuted=True)
    assert (control.pred - control.target).abs().mean() > 0.5


class ConstantMap(nn.Module):
    """Jumps every point to the constant c, v = (c − x)/(b − a): shows which network a target came from."""

    def __init__(self, c: float):
        super().__init__()
        self.c, self.p = c, nn.Parameter(torch.zeros((), dtype=D))

    def forward(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return (self.c - x) / expand_time(b - a, x) + 0 * self.p


def tcm_term(student: nn.Module, stage1: nn.Module, step: int):
    """TCM's term (σ′ = 1, q = 2, κ = 0, one ECT stage per step, stage 1 ended at step 1) on 4096 Gaussian samples,
    with σ_t, σ_r and the boundary rows."""
    exact = gaussian_2d()
    setting = Setting(LinearInterpolant(exact.sigma0), None, 1.0, stage=CountingNet(stage1))
    method = TCMMethod(TCMParams(q=2.0, kappa=0.0, stage_steps=1, stage1={"steps": 1}), setting)
    x1 = exact.mean + exact.std * torch.randn(4096, 2, generator=torch.Generator().manual_seed(8), dtype=D)
    (term,) = method.terms(CountingNet(student), x1, step, torch.Generator().manual_seed(9))
    sigma_t = canonical_to_edm(term.a, 1.0)
    sigma_r = ect_sigma_r(sigma_t, step + 1, 2.0, 0.0, 1.0, 0.999, 1e-6)
    return term, sigma_t, sigma_r, torch.arange(4096) < 1024


def test_tcm_takes_targets_below_the_transition_from_the_frozen_stage_and_weights_the_boundary_apart():
    """Student and stage 1 jump to 0 and 1: every target whose σ_r < σ′ is stage 1's, every other the student's; no
    gradient reaches stage 1. σ_t ≥ σ′ everywhere, a quarter of the rows at σ′ itself, and the weights make the
    loss mean(others) + 0.1·mean(boundary) of ℓ/Δσ."""
    stage1 = ConstantMap(1.0)
    term, sigma_t, sigma_r, boundary = tcm_term(ConstantMap(0.0), stage1, step=2)
    below = sigma_r < 1.0
    assert (sigma_t >= 1.0 - 1e-9).all() and torch.allclose(sigma_t[boundary], torch.ones(1024, dtype=D))
    assert below[boundary].all() and 0 < below[~boundary].sum() < 3072  # interior rows on both sides of σ′
    torch.testing.assert_close(term.target[below], torch.ones_like(term.target[below]))
    torch.testing.assert_close(term.target[~below], torch.zeros_like(term.target[~below]))
    assert not term.target.requires_grad
    assert torch.autograd.grad(term.pred.sum(), stage1.p, allow_unused=True)[0] is None
    share = term.weight * (sigma_t - sigma_r)
    assert share[~boundary].sum() / 4096 == pytest.approx(1.0) and share[boundary].sum() / 4096 == pytest.approx(0.1)


def test_tcm_with_the_exact_stage_one_shrinks_with_delta_sigma_and_a_wrong_one_holds_the_boundary():
    """With stage 1 the exact map, the boundary and the interior residuals both shrink with Δσ (16× from stage 4 to
    8, as ECT); with stage 1 20% off in s (control) the boundary residual stays 10× larger, while the interior rows
    whose σ_r ≥ σ′ do not change at all."""

    def residuals(stage1: nn.Module, step: int) -> tuple[Tensor, Tensor, Tensor]:
        term, _, sigma_r, boundary = tcm_term(GaussianFamily(gaussian_2d()), stage1, step)
        error = (term.pred - term.target).abs().sum(1).detach()
        return error[boundary].mean(), error[~boundary].mean(), term.target[~boundary & (sigma_r >= 1.0)]

    exact = GaussianFamily(gaussian_2d())
    early, late = residuals(exact, 3), residuals(exact, 7)
    assert early[0] / late[0] == pytest.approx(16, rel=0.15) and early[1] / late[1] == pytest.approx(16, rel=0.15)
    wrong = residuals(GaussianFamily(gaussian_2d(), 1.2), 7)
    assert wrong[0] > 10 * late[0]
    torch.testing.assert_close(wrong[2], late[2])


def test_tcm_draws_log_sigma_from_the_truncated_student_t():
    """Kolmogorov–Smirnov distance of 20k draws to the truncated CDF < 0.015; the untruncated CDF (control) > 0.3."""
    low, high = 0.0, math.log(80.0)
    z = truncated_student_t(torch.Generator().manual_seed(0), 20000, 0.01, 0.0, 0.2, low, high).sort().values
    cdf = scipy.special.stdtr(0.01, z.numpy() / 0.2)
    lo, hi = scipy.special.stdtr(0.01, low / 0.2), scipy.special.stdtr(0.01, high / 0.2)
    empirical = np.arange(1, 20001) / 20000
    assert np.abs((cdf - lo) / (hi - lo) - empirical).max() < 0.015
    assert np.abs(cdf - empirical).max() > 0.3


def teacher_file(path, **sections) -> str:
    """An orch teacher file of a freshly built network for a trial with these sections (not trained)."""
    config, problems = resolve_trial_config(sections)
    assert not problems, problems
    torch.save({"config": config, "net": build_network(TrialConfig.parse(config)).state_dict()}, path)
    return str(path)


def test_a_named_teacher_or_stage_that_does_not_fit_the_trial_is_refused_before_anything_runs(tmp_path, capsys):
    """Exit 2 naming the option, the file and the mismatch, nothing created: a teacher of another dataset, a
    teacher whose network differs from the model that starts from it, a stage of another method; a fitting
    stage passes these checks (the control)."""
    gmm, mlp = {"name": "gmm", "conditional": True}, {"name": "mlp", "width": 16, "depth": 2}
    checker = teacher_file(tmp_path / "checker.pt", dataset={"name": "checkerboard"}, model=mlp, method={"name": "fm"})
    wide = teacher_file(tmp_path / "wide.pt", dataset=gmm, model=mlp | {"width": 32}, method={"name": "fm"})
    fm = teacher_file(tmp_path / "fm.pt", dataset=gmm, model=mlp, method={"name": "fm"})
    ect = teacher_file(tmp_path / "ect.pt", dataset=gmm, model=mlp, method={"name": "ect"})
    cases = [
        ({"name": "scd", "teacher": {"path": checker}}, "method.teacher.path", "dataset 'checkerboard', this"),
        (
            {"name": "scd", "teacher": {"path": wide}},
            "method.teacher.path",
            "classes.labels.weight: (9, 32) in the file",
        ),
        ({"name": "tcm", "stage1": {"path": fm}}, "method.stage1.path", "holds a 'fm' trial; this stage must be"),
    ]
    base = {"dataset": gmm, "model": mlp, "train": {"steps": 2}, "eval": {"nfe": [1], "num_samples": 100}}
    for method, where, mismatch in cases:
        path = tmp_path / "named.yaml"
        path.write_text(yaml.safe_dump({"name": "named", "base": base | {"method": method}}))
        assert main(["submit", str(path), "--workdir", str(tmp_path / "runs")]) == 2, method
        err = capsys.readouterr().err
        assert where in err and mismatch in err and "Traceback" not in err, err
        assert not (tmp_path / "runs").exists()
    assert (
        named_file_problems(resolve_trial_config(base | {"method": {"name": "tcm", "stage1": {"path": ect}}})[0]) == []
    )


def test_a_chain_plans_the_teacher_then_its_stage_and_the_student_starts_from_the_stage(tmp_path, capsys):
    """TCM and CMT→ECT: `orch plan` lists the teacher and each stage after it; a stage is the student's data,
    network and train section with the stage's method and budget, distilling the same teacher; the student itself
    needs no teacher."""
    study = yaml.safe_load((STUDIES / "distill.yaml").read_text())
    study["grid"] = {
        "method": [{"name": "tcm", "stage1": {"steps": 30}}, {"name": "ect", "mid_training": {"steps": 20}}]
    }
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    loaded = load_study(path)
    teacher, *stages = loaded.teachers
    assert [s.config["method"]["name"] for s in stages] == ["ect", "cmt"] and teacher.config["method"]["name"] == "fm"
    for stage, student in zip(stages, loaded.trials):
        assert student.teacher is None and student.stage == stage.id and stage.teacher == teacher.id
        assert stage.config["dataset"] == student.config["dataset"] and stage.config["model"] == student.config["model"]
        assert f"{stage.id}  {stage.config['method']['name']}, {stage.config['train']['steps']} steps" in out
    assert f"the prior stage of 1 trial(s), after {teacher.id}" in out and "for 2 trial(s)" in out


def test_stage_options_that_cannot_train_are_refused_at_validation(tmp_path, capsys):
    """A CMT stage whose trajectory length does not divide the batch, and mid-training without starting from the
    teacher, exit 2 naming the option; the same stage with a batch it divides is valid (the control)."""
    cases = [
        ({"name": "ect", "mid_training": {"steps": 10}}, 100, "method.mid_training.nfe", "does not divide"),
        ({"name": "ect", "mid_training": {"steps": 10}, "init_from_teacher": False}, 64, "method", "needs"),
    ]
    path = tmp_path / "stage.yaml"
    for method, batch, where, message in cases:
        path.write_text(yaml.safe_dump({"name": "stage", "base": {"method": method, "train": {"batch_size": batch}}}))
        with pytest.raises(SystemExit) as exited:
            main(["validate", str(path)])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and where in err and message in err, err
    path.write_text(yaml.safe_dump({"name": "stage", "base": {"method": cases[0][0], "train": {"batch_size": 64}}}))
    assert main(["validate", str(path)]) == 0


def test_a_planned_weak_teacher_may_be_a_smaller_network():
    """autoguide.model changes the planned weak teacher's network only: a width-8 guide of a width-32 teacher is
    planned as its own trial and guides a training step (the trainer's guide has the smaller layers)."""
    sections = {
        "dataset": {"name": "gmm", "conditional": True},
        "model": {"width": 32, "depth": 2},
        "method": {"name": "ayf_emd", "autoguide": {"weight": 2.0, "model": {"width": 8}}},
        "train": {"batch_size": 64},
    }
    config, problems = resolve_trial_config(sections)
    assert not problems
    assert planned_guide(config)["model"]["width"] == 8 and teacher_config(config)["model"]["width"] == 32
    trainer = trainer_for(sections)
    widths = {p.shape[0] for n, p in trainer.method.setting.guide.named_parameters() if n.endswith("layers.0.weight")}
    assert widths == {8}
    assert math.isfinite(trainer.train_step(with_stats=True)["train/loss"])


def test_dmf_distill_target_has_the_exact_map_as_fixed_point_and_the_conditional_velocity_does_not():
    """With target distill and the exact teacher b*, both of DMF's residuals vanish at the exact flow map (to the
    float32 rounding of the times DMF draws: ≤ 1e-5) and the loss's gradient with them; the default target x1 − x0
    (control) leaves per-sample residuals of order 1 and a gradient 10⁴× larger; distill costs one teacher forward
    per branch (4 forwards and 1 JVP per sample)."""
    exact = gaussian_2d()
    x1 = exact.mean + exact.std * torch.randn(4096, 2, generator=torch.Generator().manual_seed(11), dtype=D)
    for target, fixed_point in (("distill", True), ("velocity", False)):
        teacher = CountingNet(exact)
        method = DMF(DMFParams(target=target), Setting(LinearInterpolant(exact.sigma0), None, 1.0, teacher))
        student = CountingNet(GaussianFamily(exact))
        terms = method.terms(student, x1, 0, torch.Generator().manual_seed(12))
        for term in terms:
            residual, gradient = residual_and_gradient(term, list(student.net.parameters()))
            assert (residual < 1e-5 and gradient < 1e-3) if fixed_point else (residual > 0.5 and gradient > 10.0)
        assert (teacher.forwards, student.forwards, student.jvps) == ((2 * 4096, 2 * 4096, 4096) if fixed_point
                                                                      else (0, 2 * 4096, 4096))  # fmt: skip
    assert method.expected_passes(4096) == (2.0, 1.0)
    distill = DMF(DMFParams(target="distill"), Setting(LinearInterpolant(exact.sigma0), None, 1.0, teacher))
    assert distill.expected_passes(4096) == (4.0, 1.0)


def test_a_checkpoint_is_not_resumed_with_a_teacher_of_other_weights():
    """A checkpoint records the digest of its frozen networks' weights: resuming with the same teacher (another
    copy) or without one (evaluation) works; with a teacher whose weights changed (a replaced file) it is refused,
    naming the teacher and the step."""
    config, problems = resolve_trial_config({"method": {"name": "scd"}, "model": {"width": 16, "depth": 2}})
    assert not problems
    parsed, cpu = TrialConfig.parse(config), torch.device("cpu")
    teacher = build_network(TrialConfig.parse(teacher_config(config)))
    trainer = build_trainer(parsed, cpu, copy.deepcopy(teacher))
    trainer.train_step()
    state = trainer.state_dict()
    resumed = build_trainer(parsed, cpu, copy.deepcopy(teacher))
    resumed.load_state_dict(state)
    assert resumed.step == 1
    build_trainer(parsed, cpu).load_state_dict(state)  # sampling needs no teacher
    with torch.no_grad():
        next(teacher.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="the teacher has other weights than when this trial's checkpoint at step 1"):
        build_trainer(parsed, cpu, teacher).load_state_dict(state)
