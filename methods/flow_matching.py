"""Flow matching on the flow-map diagonal (METHODS.md §5.1): the baseline and every method's diagonal term."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from methods.flow_map import sample_euler
from methods.interpolants import LinearInterpolant
from methods.registry import Params
from methods.terms import METHODS, Term
from methods.time_samplers import UniformTriangle


def diagonal_term(net: nn.Module, interpolant: LinearInterpolant, x0: Tensor, x1: Tensor, t: Tensor) -> Term:
    """Flow matching: v(I_t; t, t) regressed onto the conditional velocity x1 − x0 (one forward with grad)."""
    x_t = interpolant.interpolate(x0, x1, t)
    return Term("diag", net(x_t, t, t), interpolant.velocity(x0, x1), t, t)


class FMParams(Params):
    sampler: Literal["euler"] = "euler"


class FlowMatching:
    """Flow matching with the Euler sampler: NFE = number of Euler steps."""

    def __init__(self, params: FMParams, interpolant: LinearInterpolant, time_sampler: UniformTriangle):
        self.interpolant = interpolant
        self.time_sampler = time_sampler

    def terms(self, net: nn.Module, x1: Tensor, step: int, gen: torch.Generator) -> list[Term]:
        x0 = self.interpolant.sample_base(x1.shape[0], x1.shape[1:], gen)
        return [diagonal_term(net, self.interpolant, x0, x1, self.time_sampler.diagonal(x1.shape[0], gen))]

    def sample(self, net: nn.Module, x0: Tensor, nfe: int) -> Tensor:
        return sample_euler(net, x0, nfe)


@METHODS.register("fm", FMParams)
def build_fm(params: FMParams, interpolant: LinearInterpolant, time_sampler: UniformTriangle) -> FlowMatching:
    """Flow-matching baseline (diagonal only), sampled with Euler."""
    return FlowMatching(params, interpolant, time_sampler)
