"""Shortcut models (docs/methods.md §5.4) on the canonical flow-map network.

The shortcut s(x_t; t, d) is the average velocity of the jump t → t + d, i.e. v(x; t, t + d); the reference's
finest level "d ≈ 0" (d = 2^−levels, where flow matching trains) is the diagonal v(x; t, t). The bootstrap
target is paper A's PSD through the midpoint, restricted to the dyadic grid and evaluated with the EMA weights
(docs/methods.md). The network sees the end time t + d instead of the paper's integer level log2(1/d); the
sampler is the uniform N-step flow-map sampler (d = 1/N). The interpolant keeps the reference's σ_min = 1e−5.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import Tensor, nn

from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.flow_map import sample_flow_map
from orch.methods.contracts.guidance import rows_of
from orch.methods.contracts.interpolants import LinearInterpolant, expand_time
from orch.methods.contracts.method import DimReduction, Method, MethodParams, Setting, Term, register_method
from orch.methods.runtime.parallel import Gen, positions, rand, randint, split_count


def bootstrap_term(
    target_net: nn.Module, net: CountingNet, x: Tensor, t: Tensor, d: Tensor, finest: float, clip: float | None
) -> Term:
    """v_θ(x; t, t + d) regressed onto sg ½(s1 + s2): s1 = v(x; t, t + d/2), s2 = v(x + (d/2)s1; t + d/2, t + d),
    both with `target_net` (the EMA weights), clipped to ±clip as in the reference code.

    A half-step of the finest size 2^−levels is flow matching's level, which only the diagonal trains: there s1
    and s2 are the instantaneous velocities v(x; t, t) and v(x_mid; t + d/2, t + d/2), as in the reference.
    Shapes: x (n, *data_shape); t, d (n,)."""
    half = d / 2
    reach = torch.where(half <= finest, torch.zeros_like(half), half)  # the jump each half-step asks the net for
    with torch.no_grad():
        s1 = target_net(x, t, t + reach)
        x_mid = x + expand_time(half, x) * s1
        if clip is not None:
            x_mid = x_mid.clamp(-clip, clip)
        target = (s1 + target_net(x_mid, t + half, t + half + reach)) / 2
        if clip is not None:
            target = target.clamp(-clip, clip)
    return Term("shortcut", net(x, t, t + d), target, t, t + d)


class ShortcutParams(MethodParams):
    reference_reduction: ClassVar[DimReduction] = "mean"  # the reference's plain MSE
    bootstrap_every: PositiveInt = 8
    """1 in this many samples of the batch is a bootstrap (self-consistency) sample, the rest flow matching."""
    levels: PositiveInt = 7
    """Bootstrap step sizes d = 2^−k, k ∈ {0, …, levels − 1} in equal numbers; flow-matching times are on the
    grid of 2^levels points (the reference: 128 = 2^7)."""
    bootstrap_target: Literal["ema", "live"] = "ema"
    """ema: targets from the first EMA copy of train.ema (the reference uses decay 0.999); live: current weights."""
    target_clip: PositiveFloat | None = Field(default=4.0)
    """Clip of the bootstrap target and midpoint (the reference's ±4, set for SD-VAE latents); null = none."""
    sigma_min: Annotated[float, Field(ge=0.0, lt=1.0)] = 1e-5
    """Noise left at the data end: I_τ = (1 − (1 − σ_min)τ)·x0 + τ·x1, target x1 − (1 − σ_min)·x0 (the
    reference's 1e−5); 0 is every other method's interpolant."""


@register_method("shortcut")
class Shortcut(Method):
    """Shortcut model: dyadic midpoint bootstrap with EMA targets plus flow matching; NFE = N.

    K. Frans, D. Hafner, S. Levine, P. Abbeel, "One Step Diffusion via Shortcut Models", 2024, arXiv:2410.12557.
    """

    Params, own_times, needs_ema_target = ShortcutParams, True, True

    def __init__(self, params: ShortcutParams, setting: Setting):
        super().__init__(params, setting)
        self.interpolant = LinearInterpolant(setting.interpolant.base_std, params.sigma_min)

    def expected_passes(self, batch: int) -> tuple[float, float]:
        """One forward per flow-matching sample; a bootstrap sample: two target jumps and the student."""
        bootstrap = batch // self.params.bootstrap_every
        return (batch + 2 * bootstrap) / batch, 0.0

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        p, n = self.params, x1.shape[0]
        n_boot = split_count(gen, n, lambda m: m // p.bootstrap_every)
        x0 = self.interpolant.sample_base(n, x1.shape[1:], gen)
        t_fm = randint(gen, 2**p.levels, n - n_boot) / 2**p.levels
        fm_x = self.interpolant.interpolate(x0[n_boot:], x1[n_boot:], t_fm)
        with rows_of(net, slice(n_boot, None)):
            pred = net(fm_x, t_fm, t_fm)
        terms = [Term("diag", pred, self.interpolant.velocity(x0[n_boot:], x1[n_boot:]), t_fm, t_fm)]
        if n_boot:
            k = positions(gen, n_boot, x1.device) % p.levels  # equal numbers of each step size
            d = 0.5 ** k.float()
            t = torch.floor(rand(gen, n_boot) / d) * d  # t ∈ {0, d, …, 1 − d}
            x = self.interpolant.interpolate(x0[:n_boot], x1[:n_boot], t)
            target_net = self.setting.ema_target if p.bootstrap_target == "ema" else net
            with rows_of(net, slice(None, n_boot)):
                terms.append(bootstrap_term(target_net, net, x, t, d, 0.5**p.levels, p.target_clip))
        return terms

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: Gen) -> Tensor:
        return sample_flow_map(net, x0, nfe)
