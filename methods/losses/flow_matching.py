"""Flow matching on the flow-map diagonal (docs/methods.md §5.1): the baseline and every method's diagonal term."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from orch.methods.contracts.flow_map import sample_euler, sample_heun
from orch.methods.contracts.interpolants import LinearInterpolant
from orch.methods.contracts.method import Method, MethodParams, Setting, Term, register_method
from orch.methods.contracts.time_samplers import TimeSamplerParams, Uniform
from orch.methods.runtime.parallel import Gen


def diagonal_term(net: nn.Module, interpolant: LinearInterpolant, x0: Tensor, x1: Tensor, t: Tensor) -> Term:
    """Flow matching: v(I_t; t, t) regressed onto the conditional velocity x1 − x0 (one forward with grad).
    Shapes: x0, x1 (n, *data_shape); t (n,)."""
    x_t = interpolant.interpolate(x0, x1, t)
    return Term("diag", net(x_t, t, t), interpolant.velocity(x0, x1), t, t)


class FMParams(MethodParams):
    sampler: Literal["euler", "heun"] = "euler"
    """euler: NFE = N steps. heun: exactly NFE evaluations, ⌈NFE/2⌉ steps, the last corrector skipped when NFE is
    odd (EDM's 2N − 1 convention)."""


@register_method("fm")
class FlowMatching(Method):
    """Flow-matching baseline (diagonal only), sampled with Euler or Heun.

    Y. Lipman, R. T. Q. Chen, H. Ben-Hamu, M. Nickel, M. Le, "Flow Matching for Generative Modeling", 2022,
    arXiv:2210.02747. The diagonal v(x; τ, τ) of the flow-map network is the velocity.
    """

    Params = FMParams

    def __init__(self, params: FMParams, setting: Setting):
        super().__init__(params, setting)
        self.sampler = {"euler": sample_euler, "heun": sample_heun}[params.sampler]
        self.time_sampler = setting.time_sampler or Uniform(TimeSamplerParams())

    def expected_passes(self, batch: int) -> tuple[float, float]:
        return 1.0, 0.0

    def terms(self, net: nn.Module, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        interpolant = self.setting.interpolant
        x0 = interpolant.sample_base(x1.shape[0], x1.shape[1:], gen)
        return [diagonal_term(net, interpolant, x0, x1, self.time_sampler.diagonal(x1.shape[0], gen))]

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: Gen) -> Tensor:
        return self.sampler(net, x0, nfe)
