"""Easy Consistency Tuning (ECT): consistency training started from a trained flow, with a shrinking Δσ
(docs/methods.md §10.4).

In EDM's noise levels σ (τ = σ_d/(σ_d + σ), methods/contracts/conventions.py), the consistency function at
σ_t is regressed onto its own detached value at σ_r < σ_t with the same noise ε and the same dropout masks:
    f_θ(I_{τ(σ_t)}) ≈ sg f_θ(I_{τ(σ_r)}),   σ_r = max(0, σ_t·(1 − q^{−(k+1)}·(1 + κ·sigmoid(−β·σ_t)))),
where k = ⌊step / stage_steps⌋ is the stage, so Δσ/σ_t shrinks by q every stage: early stages regress onto the
data itself (σ_r = 0), late ones approach the continuous-time limit. f_θ is orch's canonical consistency function,
the flow map to data f(I_τ) = X_{τ,1}(I_τ), which meets the boundary f = id at σ = 0 by construction (no c_skip,
c_out). The student starts from a flow-matching teacher's weights, whose flow map to data at step 0 is the
teacher's one-step jump, or from a CMT mid-training stage trained from that teacher (`mid_training`).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator
from torch import Tensor, nn

from orch.methods.contracts.conventions import edm_to_canonical, sigma_max_time
from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.flow_map import jump, sample_consistency
from orch.methods.contracts.interpolants import LinearInterpolant
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
from orch.methods.runtime.dropout import dropout_rewind
from orch.methods.runtime.parallel import Gen, randn


class MidTraining(StageSpec):
    """CMT's mid-training stage before ECT: a `cmt` trial from the same teacher, whose weights ECT starts from."""

    nfe: Annotated[int, Field(ge=2, le=64)] = 16
    """Teacher-solver steps per trajectory of the stage (CMT's CIFAR-10 recipe: 16)."""


class ECTParams(MethodParams):
    teacher: TeacherSpec = TeacherSpec()
    """The trained flow-matching model the student starts from (ECT tunes a diffusion model; no teacher term
    in the loss)."""
    init_from_teacher: bool = True
    """Start from the teacher's weights (ECT); false: plain consistency training from scratch."""
    p_mean: float = -1.1
    """Mean of log σ_t (CIFAR-10's −1.1)."""
    p_std: PositiveFloat = 2.0
    """Std of log σ_t."""
    q: Annotated[float, Field(gt=1.0)] = 2.0
    """Δσ/σ_t shrinks by q every stage (CIFAR-10: 2; ImageNet-64: 4; the "1-hour" recipe 256 with one stage)."""
    stage_steps: PositiveInt = 25000
    """Training steps per stage (ECT's CIFAR-10: 25k iterations)."""
    kappa: NonNegativeFloat = 8.0
    """κ of the σ-dependent factor 1 + κ·sigmoid(−β·σ_t) (0: ECT's `const` schedule)."""
    beta: NonNegativeFloat = 1.0
    """β of that factor."""
    huber_c: NonNegativeFloat = 1e-8
    """c of the pseudo-Huber distance √(‖D_t − D_r‖² + c²) − c; near 0 it is ECT's L2 norm (its adaptive
    weighting with p = ½), kept above 0 so that the gradient is finite where the two agree."""
    weighting: Literal["delta", "snr"] = "delta"
    """Per-sample weight: 1/(σ_t − σ_r) (CIFAR-10), or (σ_t² + σ_d²)/(σ_t·σ_d)² (ECT's ImageNet-64 branch)."""
    sigma_max: PositiveFloat = 80.0
    """Largest noise level: where the sampler starts."""
    mid_training: MidTraining | None = None
    """Start from a CMT mid-training stage (method cmt, initialised from the teacher) instead of the teacher
    itself: CMT's post-training, usually with a fixed small Δσ (a large q, stage_steps past train.steps). null:
    from the teacher."""

    @model_validator(mode="after")
    def mid_training_from_teacher(self):
        if self.mid_training is not None and not self.init_from_teacher:
            raise ValueError("mid_training starts from the teacher: it needs init_from_teacher true")
        return self


ECT = """Z. Geng, A. Pokle, W. Luo, J. Lin, J. Z. Kolter, "Consistency Models Made Easy", ICLR 2025,
    arXiv:2406.14548."""


def ect_sigma_r(
    sigma_t: Tensor, stage: int, q: float, kappa: float, beta: float, ratio_limit: float = 1.0, floor: float = 0.0
) -> Tensor:
    """σ_r = max(floor, σ_t·(1 − q^{−(stage+1)}·(1 + κ·sigmoid(−β·σ_t)))), with q^{−(stage+1)} kept at least
    1 − ratio_limit (TCM's clip; 1: none). Shape of sigma_t."""
    shrink = max(q ** -(stage + 1), 1 - ratio_limit) * (1 + kappa * torch.sigmoid(-beta * sigma_t))
    return (sigma_t * (1 - shrink)).clamp(min=floor)


def consistency_pair(
    interpolant: LinearInterpolant,
    net: nn.Module,
    x1: Tensor,
    sigma_t: Tensor,
    sigma_r: Tensor,
    sigma_data: float,
    gen: Gen,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ECT's pair on one noising line: the student's flow map to data at I_{τ(σ_t)} (with its graph), the point
    I_{τ(σ_r)} with the same base noise for the target, and τ_t, τ_r. Dropout is rewound after the student's pass,
    so the target pass that follows draws the same masks. Shapes: x1 (n, ...); sigma_t, sigma_r (n,) float64."""
    tau_t, tau_r = (edm_to_canonical(s, sigma_data).to(x1.dtype) for s in (sigma_t, sigma_r))
    x0 = interpolant.sample_base(len(x1), x1.shape[1:], gen)
    rewind = dropout_rewind(x1.device)
    pred = jump(net, interpolant.interpolate(x0, x1, tau_t), tau_t, torch.ones_like(tau_t))
    rewind()
    return pred, interpolant.interpolate(x0, x1, tau_r), tau_t, tau_r


@register_method("ect")
class ECT(Method):
    __doc__ = f"""Easy consistency tuning: discrete consistency training from a flow model with Δσ shrinking by q
    every stage; the multistep consistency sampler from σ_max, NFE = N.

    {ECT}
    """

    Params, own_times, stage_key = ECTParams, True, "mid_training"

    def __init__(self, params: ECTParams, setting: Setting):
        super().__init__(params, setting)
        self.interpolant, self.sigma_data = setting.interpolant, setting.sigma_data

    @classmethod
    def needs_teacher(cls, params: ECTParams) -> bool:
        return params.init_from_teacher and params.mid_training is None  # else the stage distils it

    @classmethod
    def train_problems(cls, params: ECTParams, train: dict) -> list[tuple[str, str]]:
        rows = train["batch_size"] // train["micro_batches"]
        if params.mid_training is not None and rows % params.mid_training.nfe:
            message = f"{params.mid_training.nfe} does not divide the micro-batch of {rows} rows of the CMT stage"
            return [("method.mid_training.nfe", message)]
        return []

    @classmethod
    def stage_method(cls, params: ECTParams) -> dict:
        stage = params.mid_training
        return {"name": "cmt", "teacher": params.teacher.model_dump(), "nfe": stage.nfe, "sigma_max": params.sigma_max}

    def expected_passes(self, batch: int) -> tuple[float, float]:
        return 2.0, 0.0  # the student at σ_t, the no-grad target at σ_r

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        p, n, sigma_data = self.params, x1.shape[0], self.sigma_data
        sigma_t = (p.p_mean + p.p_std * randn(gen, n, device=x1.device).double()).exp()
        sigma_r = ect_sigma_r(sigma_t, step // p.stage_steps, p.q, p.kappa, p.beta)
        pred, x_r, tau_t, tau_r = consistency_pair(self.interpolant, net, x1, sigma_t, sigma_r, sigma_data, gen)
        ones = torch.ones_like(tau_t)
        with torch.no_grad():
            target = jump(net, x_r, tau_r, ones)  # x1 where σ_r = 0
        if p.weighting == "delta":
            weight = 1 / (sigma_t - sigma_r)
        else:
            weight = (sigma_t**2 + sigma_data**2) / (sigma_t * sigma_data) ** 2
        return [Term("ect", pred, target, tau_t, ones, weight.to(x1.dtype), Distance("pseudo_huber", p.huber_c))]

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: Gen) -> Tensor:
        tau_min = sigma_max_time(self.params.sigma_max, self.sigma_data)
        return sample_consistency(net, x0, nfe, tau_min, self.interpolant.base_std, gen)
