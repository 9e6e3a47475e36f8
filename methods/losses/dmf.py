"""Decoupled MeanFlow (DMF): a trained flow model turned into a flow map (docs/methods.md §10.5).

The conversion is the network's: a DiT with `time_embedding: decoupled` conditions its first blocks on the start
time a and the rest on the end time b through the one time embedder, so at a = b it is exactly the flow model it
starts from (model.init_from a SiT checkpoint, or the planned teacher's weights). The loss trains every sample
twice, with fresh noise per branch: flow matching at τ_fm and MeanFlow's target on a jump (a, b), averaged, with
MeanFlow's model guidance in training (cfg_kappa = DMF's ω, cfg_interval its interval) and the adaptive
weight ℓ/sg(ℓ + c) on the mean over dimensions.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, model_validator
from torch import Tensor

from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.guidance import in_interval, teacher_velocity
from orch.methods.contracts.method import DimReduction, Setting, TeacherSpec, Term, register_method
from orch.methods.contracts.time_samplers import LogitNormal, LogitNormalParams
from orch.methods.losses.flow_matching import diagonal_term
from orch.methods.losses.meanflow import MeanFlow, MeanFlowParams, meanflow_term
from orch.methods.runtime.parallel import Gen


class DMFParams(MeanFlowParams):
    reference_reduction: ClassVar[DimReduction] = "mean"  # the reference's per-element mean
    teacher: TeacherSpec = TeacherSpec()
    """The trained flow-matching model the flow map is converted from, when model.init_from names none."""
    init_from_teacher: bool = True
    """Start from the teacher's weights (a planned flow-matching trial of this model); false: from model.init_from
    (e.g. an official SiT checkpoint) or from scratch."""
    fm_mean: float = 0.0
    """Mean of the logit-normal time of the flow-matching branch, in MeanFlow's time (t = 1 noise)."""
    t_mean: float = 0.4
    """Mean of the logit-normal draw that becomes the jump's noisier end t (a = 1 − t)."""
    r_mean: float = -1.2
    """Mean of the logit-normal draw that becomes its cleaner end r (b = 1 − r); t = max, r = min of the two."""
    time_std: PositiveFloat = 1.0
    """Std of all three logit-normals."""
    target: Literal["velocity", "distill"] = "velocity"
    """The velocity both branches regress towards: `velocity` the conditional x1 − x0, with model guidance in
    training (cfg_kappa, cfg_interval); `distill` the frozen teacher's velocity b̂(I_τ, τ), CFG-guided at
    `teacher_guidance` inside cfg_interval on class-conditional data (DMF's teacher-distillation target)."""
    teacher_guidance: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0
    """ω of the teacher's two-pass CFG in the `distill` target: v_T(∅) + ω·(v_T(y) − v_T(∅)); 1: unguided."""

    @model_validator(mode="after")
    def one_guidance(self):
        if self.target == "distill" and (self.cfg_omega != 1.0 or self.cfg_kappa != 0.0):
            raise ValueError("target distill takes its guidance from the teacher (teacher_guidance), not cfg_kappa")
        if self.target == "velocity" and self.teacher_guidance != 1.0:
            raise ValueError("teacher_guidance guides the distill target: set target: distill")
        return self


@register_method("dmf")
class DMF(MeanFlow):
    """Decoupled MeanFlow: flow matching and MeanFlow's target on every sample (averaged), times from three
    logit-normals, model guidance in training; the uniform N-step flow-map sampler.

    K. Lee, S. Yu, J. Shin, "Decoupled MeanFlow: Turning Flow Models into Flow Maps for Accelerated Sampling",
    2025, arXiv:2510.24474.
    """

    Params, own_times = DMFParams, True

    def __init__(self, params: DMFParams, setting: Setting):
        super().__init__(params, setting)
        means = {"fm": params.fm_mean, "t": params.t_mean, "r": params.r_mean}
        self.laws = {
            name: LogitNormal(LogitNormalParams(mean=mean, std=params.time_std)) for name, mean in means.items()
        }

    @classmethod
    def needs_teacher(cls, params: DMFParams) -> bool:
        return params.init_from_teacher or params.target == "distill"

    def expected_passes(self, batch: int) -> tuple[float, float]:
        """Per sample: the flow-matching forward, the jump's forward and its no-grad JVP; with guidance in training
        each branch's batched conditional + null diagonal (4 more); with the distill target each branch's teacher
        velocity (1, or 2 when CFG-guided)."""
        if self.params.target == "distill":
            guided = self.setting.num_classes is not None and self.params.teacher_guidance != 1.0
            return 2.0 + 2 * (1 + guided), 1.0
        return 2.0 + 4 * self.guides_in_training(), 1.0

    def target_velocity(self, net: CountingNet, x: Tensor, tau: Tensor, v: Tensor) -> Tensor:
        """The velocity a branch regresses towards at (x, τ), from the conditional velocity v. Shapes of x."""
        p = self.params
        if p.target == "velocity":
            return self.guided_velocity(net, x, tau, v)
        omega = p.teacher_guidance
        if omega != 1.0:  # guided inside the interval only
            omega = torch.where(in_interval(tau, p.cfg_interval), omega, 1.0).to(x.dtype)
        with torch.no_grad():
            return teacher_velocity(self.setting.teacher, self.setting.num_classes, x, tau, omega)

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        n, interpolant = x1.shape[0], self.setting.interpolant
        x0 = interpolant.sample_base(n, x1.shape[1:], gen)
        tau = self.laws["fm"].diagonal(n, gen)
        x_tau = interpolant.interpolate(x0, x1, tau)
        fm = diagonal_term(net, interpolant, x0, x1, tau)
        fm.target = self.target_velocity(net, x_tau, tau, fm.target)
        fm.name, fm.distance = "dmf_fm", self.distance
        x0 = interpolant.sample_base(n, x1.shape[1:], gen)  # fresh noise for the jump's branch
        first, second = self.laws["t"].diagonal(n, gen), self.laws["r"].diagonal(n, gen)
        a, b = first.minimum(second), first.maximum(second)  # a = 1 − max(t-draw, r-draw)
        x_a = interpolant.interpolate(x0, x1, a)
        velocity = self.target_velocity(net, x_a, a, interpolant.velocity(x0, x1))
        mf = meanflow_term(net, x_a, a, b, velocity, self.distance)
        mf.name = "dmf_mf"
        return [fm, mf]  # train.loss_reduction sample_mean averages the 2n losses: DMF's ½(L_fm + L_mf) per sample
