"""Paper B's secant losses: SDEI, STEI, SDEE, STEE (docs/methods.md §4).

The secant of the probability-flow trajectory through x_a is the mean of the velocity over the jump:
v(x_a; a, b) = E_{r~U(a,b)}[ v(x_r, r) ]. Each loss regresses the student v_θ(·; a, b) onto the velocity at one
random interior time r, with the missing point estimated by the model itself (no grad):

* EI ("estimate interior"): x_a is true, x̂_r = x_a + (r − a)·v_θ(x_a; a, r); target = velocity at x̂_r.
* EE ("estimate end point"): x_r is true, x̂_a = x_r + (a − r)·v_θ(x_r; r, a); the student is evaluated at x̂_a,
  and the target is the velocity at the true x_r. Half the jumps go backwards, since EE needs jumps r → a.
* D ("distillation"): the velocity is a frozen teacher's; T ("training"): the model's own diagonal (STEI) or
  the conditional velocity x1 − x0 (STEE).

Paper B's code writes the jump as f(x; t, s) from t to s in the same interpolant as ours: a = t, b = s.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import Tensor, nn

from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.flow_map import sample_flow_map
from orch.methods.contracts.guidance import normalised_omega, teacher_velocity
from orch.methods.contracts.interpolants import expand_time
from orch.methods.contracts.method import (
    DimReduction,
    Method,
    MethodParams,
    Setting,
    TeacherSpec,
    Term,
    register_method,
)
from orch.methods.contracts.time_samplers import TimeSampler, TimeSamplerParams, Uniform
from orch.methods.losses.flow_matching import diagonal_term
from orch.methods.runtime.dropout import dropout_rewind
from orch.methods.runtime.parallel import Gen, rand

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


def secant_jumps(
    sampler: TimeSampler, n: int, num_steps: int | None, snap: bool, step: int, gen: Gen
) -> tuple[Tensor, Tensor]:
    """Paper B's intervals (§4.2): length d ~ U[0, 1/N], start a = m·(1 − d) with m from the time sampler's law
    (uniform: exactly the released code), optionally snapped down to the N-grid; b = a + d.
    With num_steps null, (a, b) are the time sampler's ordered pairs."""
    if num_steps is None:
        return sampler.offdiagonal(n, step, gen)
    d = rand(gen, n) / num_steps
    a = sampler.marginal(n, gen) * (1 - d)
    if snap:
        a = torch.floor(a * num_steps) / num_steps
    return a, a + d


def interior_estimate_term(name: str, net: CountingNet, velocity, x_a: Tensor, a: Tensor, b: Tensor, r: Tensor) -> Term:
    """EI: v_θ(x_a; a, b) regressed onto velocity(x̂_r, r), x̂_r = x_a + (r − a)·v_θ(x_a; a, r) (no grad)."""
    rewind = dropout_rewind(x_a.device)
    with torch.no_grad():
        x_r = x_a + expand_time(r - a, x_a) * net(x_a, a, r)
        target = velocity(x_r, r)
    rewind()
    return Term(name, net(x_a, a, b), target, a, b)


def endpoint_estimate_term(
    name: str, net: CountingNet, target: Tensor, x_r: Tensor, a: Tensor, b: Tensor, r: Tensor
) -> Term:
    """EE: v_θ(x̂_a; a, b) regressed onto `target` (the velocity at the true x_r), with the start point estimated
    by a jump back from r: x̂_a = x_r + (a − r)·v_θ(x_r; r, a) (no grad)."""
    rewind = dropout_rewind(x_r.device)
    with torch.no_grad():
        x_a = x_r + expand_time(a - r, x_r) * net(x_r, r, a)
    rewind()
    return Term(name, net(x_a, a, b), target.detach(), a, b)


class SecantParams(MethodParams):
    reference_reduction: ClassVar[DimReduction] = "mean"  # the released code's mean_flat
    num_steps: PositiveInt | None = 1
    """N, the sampling steps the model is trained for: jump lengths b − a ~ U[0, 1/N] (paper B trains one model
    per N; N = 1 covers every length). null: jumps are the time sampler's ordered pairs."""


class TeacherParams(SecantParams):
    teacher: TeacherSpec = TeacherSpec()
    """The frozen flow-matching teacher whose velocity the secant targets use."""
    online_cfg: Annotated[list[Annotated[float, Field(ge=0.0, le=100.0)]], Field(min_length=2, max_length=2)] | None = (
        None
    )
    """[ω_lo, ω_hi]: paper B's online CFG (class-conditional data). Each sample draws ω ~ U[ω_lo, ω_hi], the
    target is the teacher's guided velocity v(∅) + ω·(v(y) − v(∅)) (one batched conditional + null pass), the
    student gets (ω − ω_lo)/(ω_hi − ω_lo) through its own embedding and no labels are dropped; sampling at ω
    then takes one evaluation per step. null: label dropout and the plain conditional teacher."""
    init_from_teacher: bool = True
    """Start the student from the teacher's weights, so that v_θ(x; τ, τ) is the teacher at step 0 (paper B)."""


class SDEIParams(TeacherParams):
    snap_to_grid: bool = True
    """Snap the start time down to the N-grid (the released SDEI code; "discrete t, generation only")."""


class STEIParams(TeacherParams):
    target: Literal["self", "teacher"] = "self"
    """self: the interior velocity is the model's own diagonal v_θ(x̂_r; r, r) (no grad), as the paper describes;
    teacher: a frozen teacher's, as the released ImageNet code does ("SDEI + diffusion term")."""
    diffusion_weight: PositiveFloat = 1.0
    """λ of the flow-matching term on the diagonal at a fresh time (paper B's ablation: λ = 1 best)."""
    init_from_teacher: bool = False
    """Start the student from the teacher's weights (off: STEI trains from scratch unless asked)."""
    snap_to_grid: bool = False
    """Snap the start time down to the N-grid (off: STEI's start is continuous)."""


class SDEEParams(TeacherParams):
    backward_fraction: Fraction = 0.5
    """Fraction of jumps run backwards (b < a): end-point estimation needs the model to jump r → a."""


class STEEParams(SecantParams):
    backward_fraction: Fraction = 0.5
    """Fraction of jumps run backwards (b < a): end-point estimation needs the model to jump r → a."""


PAPER_B = """Liu and Yue, "Learning to Integrate Diffusion ODEs by Averaging the Derivatives", NeurIPS 2025,
    arXiv:2505.14502."""


class Secant(Method):
    """One of paper B's four losses on every sample of the batch (STEI adds a diagonal term), sampled with the
    uniform N-step flow-map sampler (§4.3), NFE = N. `term` names the method's term in metric keys."""

    Params = SecantParams
    term: ClassVar[str]

    def __init__(self, params: SecantParams, setting: Setting):
        super().__init__(params, setting)
        self.time_sampler = setting.time_sampler or Uniform(TimeSamplerParams())

    def jumps(
        self, n: int, step: int, gen: Gen, snap: bool = False, backward_fraction: float = 0.0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(a, b, r): paper B's jumps (§4.3), starts snapped to the N-grid if `snap`, a `backward_fraction` of them
        backwards (the end-point estimates), and the interior time r ~ U(a, b)."""
        a, b = secant_jumps(self.time_sampler, n, self.params.num_steps, snap, step, gen)
        if backward_fraction:
            backward = rand(gen, n) < backward_fraction
            a, b = torch.where(backward, b, a), torch.where(backward, a, b)
        return a, b, a + rand(gen, n) * (b - a)

    def online_omega(self, net: CountingNet, n: int, gen: Gen) -> Tensor | None:
        """Online CFG: ω ~ U[ω_lo, ω_hi] per sample (n,), set as the student's normalised guidance input; None
        without online CFG."""
        if (cfg_range := self.embedded_guidance) is None:
            return None
        lo, hi = cfg_range
        omega = lo + (hi - lo) * rand(gen, n)
        net.condition.omega = normalised_omega(omega, cfg_range)
        return omega

    def teacher_passes(self) -> int:
        """Evaluations of one teacher velocity: 2 under online CFG (one batched conditional + null pass)."""
        return 1 if self.embedded_guidance is None else 2

    def teacher_velocity(self, x: Tensor, t: Tensor, omega: Tensor | None = None) -> Tensor:
        """v_T(x; t, t), or with online CFG the guided v_T(∅) + ω·(v_T(y) − v_T(∅)) in one batched pass."""
        return teacher_velocity(self.setting.teacher, self.setting.num_classes, x, t, omega)

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: Gen) -> Tensor:
        return sample_flow_map(net, x0, nfe)


class InteriorEstimate(Secant):
    """EI: the start x_a is true, the interior point x̂_r estimated; the target is `velocity` at x̂_r."""

    def velocity(self, net: CountingNet, omega: Tensor | None):
        return lambda x, t: self.teacher_velocity(x, t, omega)

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        interpolant = self.setting.interpolant
        x0 = interpolant.sample_base(x1.shape[0], x1.shape[1:], gen)
        a, b, r = self.jumps(x1.shape[0], step, gen, snap=self.params.snap_to_grid)
        omega = self.online_omega(net, x1.shape[0], gen)
        x_a = interpolant.interpolate(x0, x1, a)
        term = interior_estimate_term(self.term, net, self.velocity(net, omega), x_a, a, b, r)
        return [term] + self.extra(net, x0, x1, gen)

    def extra(self, net: CountingNet, x0: Tensor, x1: Tensor, gen: Gen) -> list[Term]:
        return []


class EndpointEstimate(Secant):
    """EE: the interior point x_r is true, the start x̂_a estimated; the target is `target` at the true x_r."""

    def target(self, x_r: Tensor, r: Tensor, x0: Tensor, x1: Tensor, omega: Tensor | None) -> Tensor:
        raise NotImplementedError

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        interpolant = self.setting.interpolant
        x0 = interpolant.sample_base(x1.shape[0], x1.shape[1:], gen)
        a, b, r = self.jumps(x1.shape[0], step, gen, backward_fraction=self.params.backward_fraction)
        omega = self.online_omega(net, x1.shape[0], gen)
        x_r = interpolant.interpolate(x0, x1, r)
        with torch.no_grad():
            target = self.target(x_r, r, x0, x1, omega)
        return [endpoint_estimate_term(self.term, net, target, x_r, a, b, r)]


class Distilled:
    """A secant distillation (SDEI, SDEE): always a teacher, and per sample two passes of its own (an estimator
    and the student) besides the teacher's."""

    def expected_passes(self, batch: int) -> tuple[float, float]:
        return 2 + self.teacher_passes(), 0.0

    @classmethod
    def needs_teacher(cls, params: TeacherParams) -> bool:
        return True


@register_method("sdei")
class SDEI(Distilled, InteriorEstimate):
    __doc__ = f"""Secant distillation, estimated interior point (paper B): teacher velocity at x̂_r.

    {PAPER_B}
    """

    Params, term = SDEIParams, "sdei"  # passes: the estimator of x̂_r, the teacher there, the student


@register_method("stei")
class STEI(InteriorEstimate):
    __doc__ = f"""Secant training, estimated interior point (paper B): own diagonal (or teacher) at x̂_r, plus
    a diffusion term.

    {PAPER_B}
    """

    Params, term = STEIParams, "stei"

    def expected_passes(self, batch: int) -> tuple[float, float]:
        interior = 1 if self.params.target == "self" else self.teacher_passes()
        return 3 + interior, 0.0  # the estimator, the velocity at x̂_r, the student, the diffusion term

    @classmethod
    def needs_teacher(cls, params: STEIParams) -> bool:
        return params.target == "teacher" or params.init_from_teacher

    def velocity(self, net: CountingNet, omega: Tensor | None):
        return (lambda x, t: net(x, t, t)) if self.params.target == "self" else super().velocity(net, omega)

    def extra(self, net: CountingNet, x0: Tensor, x1: Tensor, gen: Gen) -> list[Term]:
        """λ·flow matching on the diagonal at a fresh time (paper B's diffusion term). Its target is the
        conditional (unguided) velocity, so under online CFG the student sees the guidance input of ω = 1."""
        t = self.time_sampler.diagonal(x1.shape[0], gen)
        if (cfg_range := self.embedded_guidance) is not None:
            net.condition.omega = torch.full_like(t, normalised_omega(1.0, cfg_range))
        diag = diagonal_term(net, self.setting.interpolant, x0, x1, t)
        diag.weight = torch.full_like(diag.a, self.params.diffusion_weight)
        return [diag]


@register_method("sdee")
class SDEE(Distilled, EndpointEstimate):
    __doc__ = f"""Secant distillation, estimated end point (paper B): teacher velocity at the true x_r.

    {PAPER_B}
    """

    Params, term = SDEEParams, "sdee"  # passes: the teacher at x_r, the estimator of x̂_a, the student

    def target(self, x_r: Tensor, r: Tensor, x0: Tensor, x1: Tensor, omega: Tensor | None) -> Tensor:
        return self.teacher_velocity(x_r, r, omega)


@register_method("stee")
class STEE(EndpointEstimate):
    __doc__ = f"""Secant training, estimated end point (paper B): conditional velocity x1 − x0 at r; no teacher.

    {PAPER_B}
    """

    Params, term = STEEParams, "stee"

    def expected_passes(self, batch: int) -> tuple[float, float]:
        return 2.0, 0.0  # the estimator of x̂_a (no grad), the student

    def target(self, x_r: Tensor, r: Tensor, x0: Tensor, x1: Tensor, omega: Tensor | None) -> Tensor:
        return self.setting.interpolant.velocity(x0, x1)
