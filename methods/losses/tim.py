"""Transition Models (TiM) (docs/methods.md, "TiM"), for the linear (OT-FM) transport.

TiM's state-transition identity, for the linear transport, gives MeanFlow's target v(x_a; a, b) ≈ İ + (b − a)·d/da
v along the conditional path, with the derivative by a central difference of two ordinary passes ("DDE",
differential derivation equation: no forward-mode AD, so fused attention and sharded networks work) or by a
JVP. What else differs from MeanFlow is the batch (half diagonal, a tenth jumping to data), the weight of short
intervals, a directional (cosine) term and the adaptive weight on the mean over dimensions.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, model_validator
from torch import Tensor

from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.guidance import rows_of
from orch.methods.contracts.interpolants import expand_time
from orch.methods.contracts.method import DimReduction, Distance, Setting, Term, register_method
from orch.methods.losses.meanflow import MeanFlow, MeanFlowParams
from orch.methods.runtime.dropout import dropout_rewind
from orch.methods.runtime.parallel import Gen, split_count

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


def central_difference(net: CountingNet, x: Tensor, a: Tensor, b: Tensor, velocity: Tensor, eps: float, rewind):
    """TiM's DDE: [v(x + εv̇; a + ε, b) − v(x − εv̇; a − ε, b)]/2ε, the derivative of v(I_a; a, b) in a along the
    conditional path (I_{a±ε} = I_a ± ε(x1 − x0) exactly). Both passes draw the dropout masks `rewind` restores;
    like the reference, a ± ε is not kept inside [0, b]. Shapes: x, velocity (n, ...); a, b (n,)."""
    rewind()
    ahead = net(x + eps * velocity, a + eps, b)
    rewind()
    behind = net(x - eps * velocity, a - eps, b)
    return (ahead - behind) / (2 * eps)


def interval_weight(a: Tensor, b: Tensor, sigma: float) -> Tensor:
    """TiM's weight of an interval, (σ + tan(1 − a) − tan(1 − b))^{−1/2} in its time t = 1 − a: 1/√σ on the
    diagonal, smaller for longer jumps. Shape (n,)."""
    return (sigma + torch.tan(1 - a) - torch.tan(1 - b)).rsqrt()


class TiMParams(MeanFlowParams):
    reference_reduction: ClassVar[DimReduction] = "mean"  # the reference averages over dimensions
    ratio: Fraction = 0.5
    """Fraction of samples with a real jump; the first round((1 − ratio)·B) samples of a batch have a = b
    (the reference's `diffusion_ratio` 0.5)."""
    data_fraction: Fraction = 0.1
    """The last round(data_fraction·B) samples jump to data, b = 1 (the reference's `consistency_ratio`)."""
    derivative: Literal["dde", "jvp"] = "dde"
    """How d/da v is computed: dde = central difference of two passes (the reference's default), jvp = one
    forward-mode pass with tangent (x1 − x0, 1, 0) (MeanFlow's)."""
    dde_eps: PositiveFloat = 0.005
    """ε of the central difference, in time units."""
    interval_weighting: bool = True
    """Weight each sample by (σ + tan(1 − a) − tan(1 − b))^{−1/2} ("sqrt" weighting); off: 1."""
    interval_sigma: PositiveFloat = 1.0
    """σ of the interval weight (the reference: 1, so diagonal samples weigh 1)."""
    cosine: NonNegativeFloat = 1.0
    """Weight of the directional term 1 − cos(pred, target) over channels, averaged over pixels (on in the
    reference trainer); 0 = off."""
    adaptive_c: PositiveFloat = 1e-5
    """c of the adaptive weight ℓ/sg(ℓ + c), on the mean over dimensions (the reference's)."""
    guidance_from: Literal["live", "ema"] = "ema"
    """Whose diagonal the guided target uses (cfg_omega ≠ 1 or cfg_kappa ≠ 0): ema = the first EMA copy (the
    reference's "mg" configs), live = the current weights (MeanFlow's)."""

    @model_validator(mode="after")
    def fractions_fit(self):
        if (1 - self.ratio) + self.data_fraction > 1 + 1e-12:
            raise ValueError(
                f"1 − ratio ({1 - self.ratio:g}) diagonal samples and data_fraction ({self.data_fraction:g}) samples "
                "jumping to data do not fit in one batch"
            )
        return self


@register_method("tim")
class TiM(MeanFlow):
    """Transition Models: MeanFlow's target with a central-difference derivative (DDE), interval weighting and a
    directional term; sampled with the uniform N-step flow-map sampler.

    Times: two sorted draws of the time sampler (default logit-normal(−0.4, 1.0)), half the batch diagonal and a
    tenth jumping to data. REPA alignment and the stochastic sampler of the reference are not implemented.

    Z. Wang, Y. Zhang, X. Yue, et al., "Transition Models: Rethinking the Generative Learning Objective", 2025,
    arXiv:2509.04394.
    """

    Params = TiMParams

    def __init__(self, params: TiMParams, setting: Setting):
        super().__init__(params, setting)
        self.distance = Distance("adaptive", params.adaptive_c, params.adaptive_p, cosine=params.cosine)

    def split(self, n: int, gen: Gen) -> tuple[int, int]:
        """(diagonal rows at the start, rows jumping to data at the end) of a batch of n."""
        n_diag = split_count(gen, n, self.diagonal_count)
        n_data = split_count(gen, n, lambda m: round(m * self.params.data_fraction))
        return n_diag, min(n_data, n - n_diag)

    def expected_passes(self, batch: int) -> tuple[float, float]:
        """The student's forward; on jumps the DDE's two passes or one JVP; the guided target's cond/null pass."""
        jumps = (batch - self.diagonal_count(batch)) / batch
        dde = self.params.derivative == "dde"
        return 1.0 + 2 * dde * jumps + 2 * self.guides_in_training(), (not dde) * jumps

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        p, n, interpolant = self.params, x1.shape[0], self.setting.interpolant
        x0 = interpolant.sample_base(n, x1.shape[1:], gen)
        a, b = self.time_sampler.offdiagonal(n, step, gen)
        n_diag, n_data = self.split(n, gen)
        b = torch.cat([a[:n_diag], b[n_diag : n - n_data], torch.ones_like(b[n - n_data :])])
        x_a = interpolant.interpolate(x0, x1, a)
        guide = self.setting.ema_target if p.guidance_from == "ema" else net
        velocity = self.guided_velocity(guide, x_a, a, interpolant.velocity(x0, x1))
        rewind = dropout_rewind(x_a.device)
        pred = net(x_a, a, b)
        derivative = torch.zeros_like(x_a)
        jumps = slice(n_diag, None)
        with torch.no_grad(), rows_of(net, jumps):
            if n_diag < n:
                derivative[jumps] = self.derivative(net, x_a[jumps], a[jumps], b[jumps], velocity[jumps], rewind)
            target = velocity + expand_time(b - a, x_a) * derivative
        weight = interval_weight(a, b, p.interval_sigma) if p.interval_weighting else None
        return [Term("tim", pred, target, a, b, weight=weight, distance=self.distance)]

    def derivative(self, net: CountingNet, x: Tensor, a: Tensor, b: Tensor, velocity: Tensor, rewind) -> Tensor:
        """d/da v(I_a; a, b) along the conditional path, by DDE or JVP (no grad: it only feeds the target)."""
        if self.params.derivative == "dde":
            return central_difference(net, x, a, b, velocity, self.params.dde_eps, rewind)
        return net.jvp((x, a, b), (velocity, torch.ones_like(a), torch.zeros_like(b)))[1]
