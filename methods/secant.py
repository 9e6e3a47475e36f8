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

from methods.counting import CountingNet
from methods.flow_map import sample_flow_map
from methods.flow_matching import diagonal_term
from methods.interpolants import expand_time
from methods.terms import METHODS, DimReduction, MethodParams, Setting, TeacherSpec, Term
from methods.time_samplers import TimeSampler, TimeSamplerParams, Uniform

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


def dropout_rewind(device: torch.device):
    """A function that rewinds the RNG that dropout draws from to this point, so that a later pass draws the
    same masks as an earlier one (paper B reuses the RNG state between the student and estimator passes)."""
    if device.type == "cuda":
        state = torch.cuda.get_rng_state(device)
        return lambda: torch.cuda.set_rng_state(state, device)
    state = torch.get_rng_state()
    return lambda: torch.set_rng_state(state)


def secant_jumps(
    sampler: TimeSampler, n: int, num_steps: int | None, snap: bool, step: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Paper B's intervals (§4.2): length d ~ U[0, 1/N], start a = m·(1 − d) with m from the time sampler's law
    (uniform: exactly the released code), optionally snapped down to the N-grid; b = a + d.
    With num_steps null, (a, b) are the time sampler's ordered pairs."""
    if num_steps is None:
        return sampler.offdiagonal(n, step, gen)
    d = torch.rand(n, generator=gen, device=gen.device) / num_steps
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
    init_from_teacher: bool = True
    """Start the student from the teacher's weights, so that v_θ(x; τ, τ) is the teacher at step 0 (paper B)."""


class SDEIParams(TeacherParams):
    snap_to_grid: bool = True
    """Snap the start time down to the N-grid (the released SDEI code; "discrete t, generation only")."""

    @property
    def uses_teacher(self) -> bool:
        return True


class STEIParams(TeacherParams):
    target: Literal["self", "teacher"] = "self"
    """self: the interior velocity is the model's own diagonal v_θ(x̂_r; r, r) (no grad), as the paper describes;
    teacher: a frozen teacher's, as the released ImageNet code does ("SDEI + diffusion term")."""
    diffusion_weight: PositiveFloat = 1.0
    """λ of the flow-matching term on the diagonal at a fresh time (paper B's ablation: λ = 1 best)."""
    init_from_teacher: bool = False
    snap_to_grid: bool = False

    @property
    def uses_teacher(self) -> bool:
        return self.target == "teacher" or self.init_from_teacher


class SDEEParams(TeacherParams):
    backward_fraction: Fraction = 0.5
    """Fraction of jumps run backwards (b < a): end-point estimation needs the model to jump r → a."""

    @property
    def uses_teacher(self) -> bool:
        return True


class STEEParams(SecantParams):
    backward_fraction: Fraction = 0.5
    """Fraction of jumps run backwards (b < a): end-point estimation needs the model to jump r → a."""


class Secant:
    """One of paper B's four losses on every sample of the batch (STEI adds a diagonal term), sampled with the
    uniform N-step flow-map sampler (§4.5), NFE = N."""

    def __init__(self, name: str, params: SecantParams, setting: Setting):
        self.name, self.params = name, params
        self.interpolant = setting.interpolant
        self.time_sampler = setting.time_sampler or Uniform(TimeSamplerParams())
        self.teacher = setting.teacher

    def teacher_velocity(self, x: Tensor, t: Tensor) -> Tensor:
        return self.teacher(x, t, t)

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: torch.Generator) -> list[Term]:
        p, n = self.params, x1.shape[0]
        x0 = self.interpolant.sample_base(n, x1.shape[1:], gen)
        a, b = secant_jumps(self.time_sampler, n, p.num_steps, getattr(p, "snap_to_grid", False), step, gen)
        if getattr(p, "backward_fraction", 0.0):
            backward = torch.rand(n, generator=gen, device=gen.device) < p.backward_fraction
            a, b = torch.where(backward, b, a), torch.where(backward, a, b)
        r = a + torch.rand(n, generator=gen, device=gen.device) * (b - a)
        if self.name in ("sdei", "stei"):
            self_target = self.name == "stei" and p.target == "self"
            velocity = (lambda x, t: net(x, t, t)) if self_target else self.teacher_velocity
            x_a = self.interpolant.interpolate(x0, x1, a)
            terms = [interior_estimate_term(self.name, net, velocity, x_a, a, b, r)]
        else:
            x_r = self.interpolant.interpolate(x0, x1, r)
            with torch.no_grad():
                target = self.teacher_velocity(x_r, r) if self.name == "sdee" else self.interpolant.velocity(x0, x1)
            terms = [endpoint_estimate_term(self.name, net, target, x_r, a, b, r)]
        if self.name == "stei":
            diag = diagonal_term(net, self.interpolant, x0, x1, self.time_sampler.diagonal(n, gen))
            diag.weight = torch.full_like(diag.a, p.diffusion_weight)
            terms.append(diag)
        return terms

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: torch.Generator) -> Tensor:
        return sample_flow_map(net, x0, nfe)


@METHODS.register("sdei", SDEIParams, provides=("time_sampler",))
def build_sdei(params: SDEIParams, setting: Setting) -> Secant:
    """Secant distillation, estimated interior point (paper B): teacher velocity at x̂_r."""
    return Secant("sdei", params, setting)


@METHODS.register("stei", STEIParams, provides=("time_sampler",))
def build_stei(params: STEIParams, setting: Setting) -> Secant:
    """Secant training, estimated interior point (paper B): own diagonal (or teacher) at x̂_r + diffusion term."""
    return Secant("stei", params, setting)


@METHODS.register("sdee", SDEEParams, provides=("time_sampler",))
def build_sdee(params: SDEEParams, setting: Setting) -> Secant:
    """Secant distillation, estimated end point (paper B): teacher velocity at the true x_r."""
    return Secant("sdee", params, setting)


@METHODS.register("stee", STEEParams, provides=("time_sampler",))
def build_stee(params: STEEParams, setting: Setting) -> Secant:
    """Secant training, estimated end point (paper B): conditional velocity x1 − x0 at r; no teacher."""
    return Secant("stee", params, setting)
