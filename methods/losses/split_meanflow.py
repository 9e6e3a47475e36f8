"""SplitMeanFlow (docs/methods.md, "SplitMeanFlow"): interval-splitting consistency, which is PSD-U.

For r ≤ s ≤ t in MeanFlow's time, additivity of the integral gives (t − r)u(z_t; r, t) = (t − s)u(z_t; s, t) +
(s − r)u(z_s; r, s). Canonically (a = 1 − t, c = 1 − s, b = 1 − r, λ = (c − a)/(b − a)) the detached target is
λ·v(I_a; a, c) + (1 − λ)·v(X_{a,c}(I_a); c, b): paper A's PSD target with γ = 1 − λ, and λ ~ U(0, 1) makes it
PSD-U exactly. What SplitMeanFlow changes is the rest of the recipe, all of it options of that class: the fraction
of boundary samples, their target (the data's conditional velocity or a teacher's), how the two kinds are mixed,
the time sampler and the plain mean squared error.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.method import DimReduction, Setting, TeacherSpec, Term, register_method
from orch.methods.contracts.time_samplers import LogitNormal, LogitNormalParams
from orch.methods.losses.self_distillation import DiagFraction, PSDParams, PSDUniform
from orch.methods.runtime.parallel import Gen, shared_rand


class SplitMeanFlowParams(PSDParams):
    reference_reduction: ClassVar[DimReduction] = "mean"  # plain MSE
    diag_fraction: DiagFraction = 0.5
    """p: the fraction of boundary (a = b) samples; the reviews report collapse below 0.5."""
    mixing: Literal["batch", "step"] = "batch"
    """batch: the first ⌊pB⌋ samples of every batch are boundary samples (as PSD); step: each step is a boundary
    step with probability p, else a consistency step, over its whole batch (an unofficial port's reading). The
    paper does not say which."""
    boundary: Literal["data", "teacher"] = "data"
    """The boundary target: data = the conditional velocity x1 − x0 (flow matching, from scratch); teacher = a
    frozen flow-matching teacher's velocity v_T(I_τ; τ, τ) (the paper's distillation runs)."""
    teacher: TeacherSpec = TeacherSpec()
    """The teacher of `boundary: teacher` (unused otherwise)."""


@register_method("split_meanflow")
class SplitMeanFlow(PSDUniform):
    """SplitMeanFlow: the interval-splitting identity as PSD-U, half the batch boundary samples, plain MSE.

    Times: two sorted draws of the time sampler (default logit-normal(0, 1), an unofficial port's choice; the
    paper does not state it); the sampler is the uniform N-step flow-map sampler.

    Y. Guo, W. Wang, Z. Yuan, et al., "SplitMeanFlow: Interval Splitting Consistency in Few-Step Generative
    Modeling", 2025, arXiv:2507.16884.
    """

    Params = SplitMeanFlowParams

    def __init__(self, params: SplitMeanFlowParams, setting: Setting):
        super().__init__(params, setting)
        self.time_sampler = setting.time_sampler or LogitNormal(LogitNormalParams(mean=0.0, std=1.0))

    @classmethod
    def needs_teacher(cls, params: SplitMeanFlowParams) -> bool:
        return params.boundary == "teacher"

    def diagonal_rows(self, n: int, step: int, gen: Gen) -> int:
        if self.params.mixing == "batch":
            return super().diagonal_rows(n, step, gen)
        boundary_step = self.time_sampler.diagonal_only(step) or shared_rand(gen) < self.params.diag_fraction
        return n if boundary_step else 0

    def diagonal(self, net: CountingNet, x0: Tensor, x1: Tensor, t: Tensor) -> Term:
        term = super().diagonal(net, x0, x1, t)
        if self.params.boundary == "teacher":
            with torch.no_grad():
                term.target = self.setting.teacher(self.setting.interpolant.interpolate(x0, x1, t), t, t)
        return term

    def expected_passes(self, batch: int) -> tuple[float, float]:
        """Per batch split: the boundary sample's forward (and its teacher's), the consistency sample's three;
        with per-step mixing, the same in expectation over steps."""
        p = self.params
        share = p.diag_fraction if p.mixing == "step" else self.diagonal_count(batch) / batch
        return share * (1 + (p.boundary == "teacher")) + 3 * (1 - share), 0.0
