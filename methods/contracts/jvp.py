"""JVP back-ends: the directional derivative of a network v(x; a, b) along a tangent (ẋ, ȧ, ḃ), by forward-mode
AD or by finite differences, chosen by `train.jvp` (docs/methods.md, "JVP back-ends").

Finite differences need only ordinary passes, so fused attention kernels, compiled and sharded networks work
unchanged; they trade exactness for a truncation error O(ε²) (central) or O(ε) (one-sided), and in half precision
their difference is rounding noise, hence `precision: auto` runs them in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Literal

import torch
from pydantic import PositiveFloat
from torch import Tensor

from orch.methods.contracts.registry import Params

Primals = tuple[Tensor, Tensor, Tensor]
Network = Callable[[Tensor, Tensor, Tensor], Tensor]


class JvpConfig(Params):
    """The `train.jvp` section: how methods that differentiate the network along time compute that derivative."""

    mode: Literal["exact", "finite_difference"] = "exact"
    """`exact`: forward-mode AD through the network (torch.func.jvp); `finite_difference`: (v(p + εṗ) −
    v(p − εṗ)) / 2ε from ordinary passes (fused kernels, compiled networks), one-sided where a step would leave
    0 ≤ a ≤ b ≤ 1."""
    eps: PositiveFloat = 1e-3
    """Step ε of finite differences, in time units along the tangent (unused by `exact`)."""
    precision: Literal["auto", "fp32", "autocast"] = "auto"
    """Numerics of the JVP's passes when training in bf16/fp16: `autocast` as the rest of the step, `fp32` with
    autocast off; `auto`: fp32 for finite differences, autocast for exact."""

    def in_fp32(self) -> bool:
        return self.precision == "fp32" or (self.precision == "auto" and self.mode == "finite_difference")


def exact_jvp(f: Network, primals: Primals, tangents: Primals) -> tuple[Tensor, Tensor]:
    """(v, dv) by forward-mode AD; differentiable with respect to the parameters."""
    return torch.func.jvp(f, primals, tangents)


def step_directions(a: Tensor, b: Tensor, da: Tensor, db: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Which of the steps p ± εṗ keep the times in the flow map's domain 0 ≤ a ≤ b ≤ 1 (never crossing the
    diagonal): two boolean tensors of shape (n,), forward and backward."""
    a, b, da, db = (t.double() for t in (a, b, da, db))

    def inside(sign: float) -> Tensor:
        a2, b2 = a + sign * eps * da, b + sign * eps * db
        return (a2 >= 0) & (a2 <= b2) & (b2 <= 1)

    return inside(1.0), inside(-1.0)


def finite_difference_jvp(
    f: Network, primals: Primals, tangents: Primals, eps: float, rng_devices: list[torch.device]
) -> tuple[Tensor, Tensor, int]:
    """(v, dv, unresolved) by differences of three passes v(p), v(p + εṗ), v(p − εṗ): central where both steps stay
    in the domain, one-sided where one does, 0 where neither does (`unresolved` counts those samples). Points and
    differences are formed in float64; every pass draws the same random numbers (dropout) as the first.
    x: (n, ...), a, b: (n,). Returns v: (n, ...), dv: (n, ...)."""
    x, a, b = primals
    _, da, db = tangents
    forward, backward = step_directions(a, b, da, db, eps)

    def point(sign: float) -> Primals:
        return tuple((p.double() + sign * eps * t.double()).to(p.dtype) for p, t in zip(primals, tangents))

    state = {d: torch.cuda.get_rng_state(d) for d in rng_devices}, torch.get_rng_state()

    def same_draws(args: Primals) -> Tensor:
        with torch.random.fork_rng(devices=rng_devices):
            for device, rng in state[0].items():
                torch.cuda.set_rng_state(rng, device)
            torch.set_rng_state(state[1])
            return f(*args)

    v = f(x, a, b)
    here = v.double()
    shape = (-1,) + (1,) * (x.dim() - 1)
    ahead = torch.where(forward.view(shape), same_draws(point(1.0)).double(), here)
    behind = torch.where(backward.view(shape), same_draws(point(-1.0)).double(), here)
    span = (eps * (forward.double() + backward.double())).view(shape)  # 2ε central, ε one-sided, 0 neither
    dv = (ahead - behind) / span.clamp(min=eps)  # neither step: 0 / ε = 0
    return v, dv.to(v.dtype), int((~forward & ~backward).sum())


def jvp_precision(config: JvpConfig, x: Tensor):
    """The autocast state of the JVP's passes: off when the config asks for fp32, unchanged otherwise."""
    return torch.autocast(x.device.type, enabled=False) if config.in_fp32() else nullcontext()
