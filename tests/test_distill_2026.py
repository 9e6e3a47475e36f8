"""Flow-map distillation from a frozen teacher (FMM-LMD/EMD, AYF-EMD/LMD) pinned on the exact Gaussian flow.

With the exact teacher velocity b* the exact flow map is a fixed point: every residual and the gradient of every
loss vanish there, for each stop-gradient placement. Each check has a control that must fail it by a wide margin.
"""

import pytest
import torch
from torch import nn

from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.interpolants import LinearInterpolant, expand_time
from orch.methods.contracts.method import Setting
from orch.methods.losses.ayf import AYFEMD, AYFEMDParams, TangentNorm, ayf_emd_term, ayf_lmd_term
from orch.methods.losses.self_distillation import esd_term, lsd_term
from tests.gaussian import ExactGaussianFlowMap, gaussian_2d
from tests.test_methods_2026 import marginal_points

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
