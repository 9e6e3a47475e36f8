"""α-Flow (docs/methods.md, "α-Flow"): one family from trajectory flow matching through Shortcut to MeanFlow.

The long jump's average velocity is regressed onto "α of the way with the shift velocity ṽ, then the model's own
jump from there": with c = a + α(b − a) and z_c = I_a + (c − a)ṽ, the detached target is α·ṽ + (1 − α)·v(z_c; c, b).
α = 1 is trajectory flow matching, α = ½ with the model's velocity as shift is the Shortcut target, and α → 0 is
MeanFlow's target ṽ + (b − a)·d/da v, which is used once α reaches 0. A curriculum over training anneals α from 1
to 0. For α > 0 the target's fixed point is biased by O(α²); only the final α = 0 phase learns the flow map.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, model_validator
from torch import Tensor

from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.guidance import rows_of
from orch.methods.contracts.interpolants import expand_time
from orch.methods.contracts.method import DimReduction, Distance, Setting, Term, register_method
from orch.methods.contracts.registry import Params
from orch.methods.losses.meanflow import MeanFlow, MeanFlowParams, meanflow_term
from orch.methods.runtime.parallel import Gen, split_count

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class AlphaSchedule(Params):
    """α over training (fractions of train.steps): 1 before `start`, 0 after `end`, in between `kind`."""

    kind: Literal["sigmoid", "linear", "constant"] = "sigmoid"
    """sigmoid: α = 1 − σ(γ·(k − k_mid)/(k_end − k_start)) (the paper's); linear: from 1 to 0; constant: `value`
    throughout."""
    start: Fraction = 0.0
    """Where the annealing starts, as a fraction of train.steps."""
    end: Fraction = 1.0
    """Where α reaches 0 (the MeanFlow phase after it)."""
    gamma: PositiveFloat = 25.0
    """γ, the steepness of the sigmoid."""
    eta: Annotated[float, Field(ge=0.0, lt=0.5)] = 5e-3
    """α below η becomes 0 (the JVP branch), above 1 − η becomes 1."""
    value: Fraction = 0.0
    """α of the constant schedule."""

    @model_validator(mode="after")
    def ordered(self):
        if self.kind != "constant" and self.start >= self.end:
            raise ValueError(f"start ({self.start:g}) must be before end ({self.end:g})")
        return self

    def __call__(self, step: int, steps: int) -> float:
        """α at training step `step` of `steps`."""
        if self.kind == "constant":
            alpha = self.value
        else:
            k, k_s, k_e = step / steps, self.start, self.end
            if k <= k_s:
                alpha = 1.0
            elif k >= k_e:
                alpha = 0.0
            elif self.kind == "linear":
                alpha = 1 - (k - k_s) / (k_e - k_s)
            else:
                alpha = 1 - 1 / (1 + math.exp(-self.gamma * (k - (k_s + k_e) / 2) / (k_e - k_s)))
        if alpha < self.eta:
            return 0.0
        return 1.0 if alpha > 1 - self.eta else alpha


def alpha_target(net: CountingNet, x: Tensor, a: Tensor, b: Tensor, shift: Tensor, alpha: float, clip: float | None):
    """α·ṽ + (1 − α)·v(z_c; c, b) with c = a + α(b − a), z_c = x + (c − a)ṽ, clipped to ±clip (no grad). Shapes:
    x, shift (n, ...); a, b (n,)."""
    c = a + alpha * (b - a)
    with torch.no_grad():
        target = alpha * shift + (1 - alpha) * net(x + expand_time(c - a, x) * shift, c, b)
    return target if clip is None else target.clamp(-clip, clip)


class AlphaFlowParams(MeanFlowParams):
    reference_reduction: ClassVar[DimReduction] = "mean"  # the reference averages over dimensions
    ratio: Fraction = 0.5
    """Fraction of samples with a real jump; the first round((1 − ratio)·B) of a batch train the diagonal
    (ρ_fm = 0.5 in the B/2 and XL/2-cfg runs)."""
    schedule: AlphaSchedule = AlphaSchedule()
    """The α curriculum."""
    adaptive_c: PositiveFloat = 1e-3
    """c of the adaptive weight ℓ/sg(ℓ + c), on the mean over dimensions (the paper's)."""
    target_clip: PositiveFloat | None = None
    """Clip of the α > 0 target to ±clip (4 in the XL and MeanFlow-cfg configs); null: none."""
    alpha_weight: Literal["alpha", "inverse", "none"] = "alpha"
    """The per-sample factor of α > 0 samples: α (the released code's), inverse = α⁻¹ (the paper's formula), or 1.
    Under the adaptive weight it only sets the weight of jump samples relative to the others."""


@register_method("alpha_flow")
class AlphaFlow(MeanFlow):
    """α-Flow: trajectory flow matching annealed into MeanFlow through the α family, with the adaptive weight;
    sampled with the uniform N-step flow-map sampler.

    Times: two sorted draws of the time sampler (default logit-normal(−0.4, 1.0); the reference's distribution
    parameters are not published), the first half of a batch diagonal.

    H. Zhang, A. Siarohin, W. Menapace, et al., "AlphaFlow: Understanding and Improving MeanFlow Models", 2025,
    arXiv:2510.20771.
    """

    Params = AlphaFlowParams

    def __init__(self, params: AlphaFlowParams, setting: Setting):
        super().__init__(params, setting)
        self.steps = setting.steps or 1
        self.alpha = params.schedule(0, self.steps)
        self.distance = Distance("adaptive", params.adaptive_c, params.adaptive_p)

    def expected_passes(self, batch: int) -> tuple[float, float]:
        """At the α of the last step trained: every sample's forward; on jumps one no-grad forward (α > 0) or
        one no-grad JVP (α = 0); the guided shift's cond/null pass."""
        jumps = (batch - self.diagonal_count(batch)) / batch
        jvp = self.alpha == 0.0
        return 1.0 + (not jvp) * jumps + 2 * self.guides_in_training(), jvp * jumps

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        p, n, interpolant = self.params, x1.shape[0], self.setting.interpolant
        self.alpha = p.schedule(step, self.steps)
        x0 = interpolant.sample_base(n, x1.shape[1:], gen)
        a, b = self.time_sampler.offdiagonal(n, step, gen)
        n_diag = split_count(gen, n, self.diagonal_count)
        x_a = interpolant.interpolate(x0, x1, a)
        shift = self.guided_velocity(net, x_a, a, interpolant.velocity(x0, x1))
        terms = []
        if n_diag:
            with rows_of(net, slice(None, n_diag)):
                diag = net(x_a[:n_diag], a[:n_diag], a[:n_diag])
            terms.append(Term("diag", diag, shift[:n_diag], a[:n_diag], a[:n_diag], distance=self.distance))
        if n_diag < n:
            rows = slice(n_diag, None)
            with rows_of(net, rows):
                terms.append(self.jump_term(net, x_a[rows], a[rows], b[rows], shift[rows]))
        return terms

    def jump_term(self, net: CountingNet, x: Tensor, a: Tensor, b: Tensor, shift: Tensor) -> Term:
        """MeanFlow's term at α = 0; the α target otherwise, weighted α per sample (the released code)."""
        if self.alpha == 0.0:
            term = meanflow_term(net, x, a, b, shift, self.distance)
        else:
            target = alpha_target(net, x, a, b, shift, self.alpha, self.params.target_clip)
            factor = {"alpha": self.alpha, "inverse": 1 / self.alpha, "none": None}[self.params.alpha_weight]
            weight = None if factor is None else torch.full_like(a, factor)
            term = Term("meanflow", net(x, a, b), target, a, b, weight=weight, distance=self.distance)
        term.name = "alpha"
        return term
