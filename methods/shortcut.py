"""Shortcut models (METHODS.md §5.4) on the canonical flow-map network.

The shortcut s(x_t; t, d) is the average velocity of the jump t → t + d, i.e. v(x; t, t + d); "d ≈ 0" is the
diagonal v(x; t, t). The bootstrap target is paper A's PSD through the midpoint, restricted to the dyadic grid
and evaluated with the EMA weights (METHODS.md §3.6). The network sees the end time t + d instead of the
paper's integer level log2(1/d); the sampler is the uniform N-step flow-map sampler (d = 1/N).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import Tensor, nn

from methods.counting import CountingNet
from methods.flow_map import sample_flow_map
from methods.interpolants import expand_time
from methods.registry import Params
from methods.terms import METHODS, Setting, Term


def bootstrap_term(
    target_net: nn.Module, net: CountingNet, x: Tensor, t: Tensor, d: Tensor, clip: float | None
) -> Term:
    """v_θ(x; t, t + d) regressed onto sg ½(s1 + s2): s1 = v(x; t, t + d/2), s2 = v(x + (d/2)s1; t + d/2, t + d),
    both with `target_net` (the EMA weights), clipped to ±clip as in the reference code."""
    half = d / 2
    with torch.no_grad():
        s1 = target_net(x, t, t + half)
        x_mid = x + expand_time(half, x) * s1
        if clip is not None:
            x_mid = x_mid.clamp(-clip, clip)
        target = (s1 + target_net(x_mid, t + half, t + d)) / 2
        if clip is not None:
            target = target.clamp(-clip, clip)
    return Term("shortcut", net(x, t, t + d), target, t, t + d)


class ShortcutParams(Params):
    bootstrap_every: PositiveInt = 8
    """1 in this many samples of the batch is a bootstrap (self-consistency) sample, the rest flow matching."""
    levels: PositiveInt = 7
    """Bootstrap step sizes d = 2^−k, k ∈ {0, …, levels − 1} in equal numbers; flow-matching times are on the
    grid of 2^levels points (the reference: 128 = 2^7)."""
    bootstrap_target: Literal["ema", "live"] = "ema"
    """ema: targets from the first EMA copy of train.ema (the reference uses decay 0.999); live: current weights."""
    target_clip: PositiveFloat | None = Field(default=4.0)
    """Clip of the bootstrap target and midpoint (the reference's ±4, set for SD-VAE latents); null = none."""


class Shortcut:
    """Flow matching at dyadic times plus midpoint self-consistency at dyadic step sizes; NFE = N."""

    def __init__(self, params: ShortcutParams, setting: Setting):
        self.params, self.interpolant = params, setting.interpolant
        self.ema_net: nn.Module | None = None  # set by the trainer when bootstrap_target is "ema"

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: torch.Generator) -> list[Term]:
        p, n = self.params, x1.shape[0]
        n_boot = n // p.bootstrap_every
        x0 = self.interpolant.sample_base(n, x1.shape[1:], gen)
        rand = lambda high, size: torch.randint(high, (size,), generator=gen, device=gen.device)  # noqa: E731
        t_fm = rand(2**p.levels, n - n_boot) / 2**p.levels
        fm_x = self.interpolant.interpolate(x0[n_boot:], x1[n_boot:], t_fm)
        terms = [Term("diag", net(fm_x, t_fm, t_fm), self.interpolant.velocity(x0[n_boot:], x1[n_boot:]), t_fm, t_fm)]
        if n_boot:
            k = torch.arange(n_boot, device=x1.device) % p.levels  # equal numbers of each step size
            d = 0.5 ** k.float()
            t = torch.floor(torch.rand(n_boot, generator=gen, device=gen.device) / d) * d  # t ∈ {0, d, …, 1 − d}
            x = self.interpolant.interpolate(x0[:n_boot], x1[:n_boot], t)
            target_net = self.ema_net if p.bootstrap_target == "ema" else net
            terms.append(bootstrap_term(target_net, net, x, t, d, p.target_clip))
        return terms

    def sample(self, net: nn.Module, x0: Tensor, nfe: int) -> Tensor:
        return sample_flow_map(net, x0, nfe)


@METHODS.register("shortcut", ShortcutParams)
def build_shortcut(params: ShortcutParams, setting: Setting) -> Shortcut:
    """Shortcut model: dyadic midpoint bootstrap with EMA targets plus flow matching."""
    return Shortcut(params, setting)
