"""Truncated consistency models (TCM), stage 2: consistency training above a transition noise level σ′, with the
frozen stage-1 consistency model as the boundary condition (docs/methods.md §10.7).

Stage 1 is ECT from the teacher (a prior stage trial, `stage1`). Stage 2 starts from it and trains on σ ≥ σ′ only:
    F(x, σ) = f_θ(x, σ) for σ ≥ σ′, f₁(x, σ) (frozen stage 1) below,
    ℓ = ‖f_θ(I_{τ(σ_t)}) − sg F(I_{τ(σ_r)})‖ / (σ_t − σ_r),   log σ_t ~ Student-t truncated to [log σ′, log σ_max],
with ECT's shrinking σ_r continued from where stage 1 stopped. A fraction of every batch sits at σ_t = σ′, whose
σ_r < σ′ takes its target from f₁: the boundary, weighted apart. Sampling uses the student alone.
"""

from __future__ import annotations

import math
from typing import Annotated

import scipy.special
import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt
from torch import Tensor, nn

from orch.methods.contracts.conventions import edm_to_canonical, sigma_max_time
from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.flow_map import jump, sample_consistency, sample_consistency_at
from orch.methods.contracts.interpolants import expand_time
from orch.methods.contracts.method import (
    Distance,
    Method,
    MethodParams,
    Setting,
    StageSpec,
    TeacherSpec,
    Term,
    register_method,
)
from orch.methods.losses.ect import consistency_pair, ect_sigma_r
from orch.methods.runtime.parallel import Gen, rand

TCM = """S. Lee, Y. Xu, T. Geffner, G. Fanti, K. Kreis, A. Vahdat, W. Nie, "Truncated Consistency Models",
    ICLR 2025, arXiv:2410.14895."""


class TCMParams(MethodParams):
    teacher: TeacherSpec = TeacherSpec()
    """The flow-matching model stage 1 starts from (as ECT's)."""
    stage1: StageSpec = StageSpec()
    """Stage 1: an `ect` trial from the teacher with this method's schedule options, trained for `steps` (or a
    trained one named by `path`); stage 2 starts from it and keeps it frozen below σ′."""
    sigma_prime: PositiveFloat = 1.0
    """σ′, the transition noise level: stage 2 trains on σ ≥ σ′ only (CIFAR-10: 1)."""
    t_df: PositiveFloat = 0.01
    """Degrees of freedom of the Student-t of log σ_t (CIFAR-10: 0.01, nearly log-uniform)."""
    t_loc: float = 0.0
    """Its location."""
    t_scale: PositiveFloat = 0.2
    """Its scale."""
    boundary_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.25
    """The fraction of each batch placed at σ_t = σ′ (their targets come from stage 1)."""
    boundary_weight: NonNegativeFloat = 0.1
    """w_b: the loss is mean over the other rows + w_b × mean over the boundary rows."""
    q: Annotated[float, Field(gt=1.0)] = 2.0
    """Δσ/σ_t shrinks by q every ECT stage (both stages)."""
    stage_steps: PositiveInt = 25000
    """Training steps per ECT stage; stage 2's count continues from stage 1's `steps`."""
    kappa: NonNegativeFloat = 8.0
    """κ of ECT's factor 1 + κ·sigmoid(−β·σ_t)."""
    beta: NonNegativeFloat = 1.0
    """β of that factor."""
    ratio_limit: Annotated[float, Field(gt=0.0, le=1.0)] = 0.999
    """σ_r/σ_t before the factor stays at most this (the shrink never passes 1 − ratio_limit)."""
    huber_c: NonNegativeFloat = 1e-8
    """c of the pseudo-Huber distance (≈ the L2 norm, as ECT)."""
    sigma_max: PositiveFloat = 80.0
    """Largest noise level: where the sampler starts."""
    mid_sigma: PositiveFloat | None = 0.821
    """σ at which 2-step sampling re-noises: the reference code's default 0.821 (below σ′, where the student was not
    trained); FastGen recommends σ′ itself. Which one gave the paper's 2-step numbers is not known. null: orch's
    uniform consistency grid. Other step counts use that grid."""


def truncated_student_t(gen: Gen, n: int, df: float, loc: float, scale: float, low: float, high: float) -> Tensor:
    """n draws of a Student-t(df, loc, scale) truncated to [low, high], by inverting its CDF (float64, (n,))."""
    z_low, z_high = (low - loc) / scale, (high - loc) / scale
    lo, hi = scipy.special.stdtr(df, z_low), scipy.special.stdtr(df, z_high)
    u = lo + (hi - lo) * rand(gen, n).double().cpu()
    z = torch.from_numpy(scipy.special.stdtrit(df, u.numpy())).clamp(z_low, z_high)
    return loc + scale * z


@register_method("tcm")
class TCMMethod(Method):
    __doc__ = f"""Truncated consistency training (stage 2) from an ECT stage 1 kept frozen below σ′; the student's
    consistency sampler, NFE = N.

    {TCM}
    """

    Params, own_times, stage_key = TCMParams, True, "stage1"

    def __init__(self, params: TCMParams, setting: Setting):
        super().__init__(params, setting)
        self.interpolant, self.sigma_data = setting.interpolant, setting.sigma_data

    @classmethod
    def stage_method(cls, params: TCMParams) -> dict:
        schedule = ("q", "stage_steps", "kappa", "beta", "huber_c", "sigma_max")
        return {"name": "ect", "teacher": params.teacher.model_dump()} | {k: getattr(params, k) for k in schedule}

    def expected_passes(self, batch: int) -> tuple[float, float]:
        return 3.0, 0.0  # the student at σ_t; at σ_r the student and stage 1, each on the whole batch

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        p, n = self.params, x1.shape[0]
        bounds = math.log(p.sigma_prime), math.log(p.sigma_max)
        sigma_t = truncated_student_t(gen, n, p.t_df, p.t_loc, p.t_scale, *bounds).to(x1.device).exp()
        boundary = torch.arange(n, device=x1.device) < round(p.boundary_fraction * n)
        sigma_t = torch.where(boundary, p.sigma_prime + 1e-8, sigma_t)
        stage = (p.stage1.steps + step) // p.stage_steps  # the Δσ schedule goes on from stage 1
        sigma_r = ect_sigma_r(sigma_t, stage, p.q, p.kappa, p.beta, p.ratio_limit, floor=1e-6)
        pred, x_r, tau_t, tau_r = consistency_pair(self.interpolant, net, x1, sigma_t, sigma_r, self.sigma_data, gen)
        ones = torch.ones_like(tau_t)
        with torch.no_grad():
            student, frozen = (jump(f, x_r, tau_r, ones) for f in (net, self.setting.stage))
            target = torch.where(expand_time(sigma_r < p.sigma_prime, x_r), frozen, student)
        n_b = int(boundary.sum())
        share = torch.where(boundary, p.boundary_weight * n / max(n_b, 1), n / max(n - n_b, 1))
        weight = share / (sigma_t - sigma_r)
        return [Term("tcm", pred, target, tau_t, ones, weight.to(x1.dtype), Distance("pseudo_huber", p.huber_c))]

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: Gen) -> Tensor:
        tau_min = sigma_max_time(self.params.sigma_max, self.sigma_data)
        if nfe == 2 and self.params.mid_sigma is not None:
            mid = float(edm_to_canonical(torch.tensor(self.params.mid_sigma), self.sigma_data))
            return sample_consistency_at(net, x0, [tau_min, mid], self.interpolant.base_std, gen)
        return sample_consistency(net, x0, nfe, tau_min, self.interpolant.base_std, gen)
