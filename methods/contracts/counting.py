"""One wrapper for every network evaluation, so cost per training sample is measured rather than assumed."""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from orch.methods.contracts.guidance import Condition
from orch.methods.contracts.jvp import JvpConfig, exact_jvp, finite_difference_jvp, jvp_precision
from orch.methods.runtime.attention import tangent_attention

# torch.func's first JVP calls torch.jit.script internally, which warns on every process start: not ours to fix.
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated")


class Counts:
    """Network evaluations weighted by batch size; shared by every wrapper of one trainer (student, EMA copy,
    teacher), so a training sample's cost includes its teacher's evaluations."""

    def __init__(self) -> None:
        self.forwards = 0
        self.jvps = 0
        self.unresolved = 0
        """Samples whose finite-difference JVP had no step inside the time domain (their derivative is 0)."""


class CountingNet(nn.Module):
    """Wraps a network v(x; a, b) and counts its evaluations.

    `forwards` counts plain forward passes (with or without grad), `jvps` counts forward-mode passes (each
    also yields the primal output, so it is not counted as a forward as well). The trainer divides both by the
    number of training samples to get `cost/fwd_per_sample` and `cost/jvp_per_sample`.

    Conditional networks get the labels (and guidance inputs) of `condition`, shared like `counts` by the
    trainer's wrappers; `takes_omega` says whether this network embeds the guidance scale (a student trained
    with online CFG does, its teacher does not).
    """

    def __init__(
        self,
        net: nn.Module,
        counts: Counts | None = None,
        condition: Condition | None = None,
        takes_omega: bool = False,
        jvp: JvpConfig | None = None,
    ):
        super().__init__()
        self.net = net
        self.jvp_config = jvp or JvpConfig()
        self.counts = counts or Counts()
        self.condition = condition or Condition()
        self.takes_omega = takes_omega

    def conditioning(self) -> dict[str, Tensor]:
        """The keyword arguments of a conditional call; none for an unconditional network."""
        kwargs = {}
        if self.condition.labels is not None:
            kwargs["labels"] = self.condition.labels
        if self.takes_omega and self.condition.omega is not None:
            kwargs["omega"] = self.condition.omega
        if self.takes_omega and self.condition.interval is not None:
            kwargs["interval"] = self.condition.interval
        return kwargs

    @property
    def forwards(self) -> int:
        return self.counts.forwards

    @property
    def jvps(self) -> int:
        return self.counts.jvps

    def forward(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        self.counts.forwards += x.shape[0]
        return self.net(x, a, b, **self.conditioning())

    def jvp(
        self, primals: tuple[Tensor, Tensor, Tensor], tangents: tuple[Tensor, Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """(v, dv): v(x; a, b) and its directional derivative along (dx, da, db), by the trainer's JVP back-end
        (`train.jvp`): one forward-mode pass, or three ordinary passes for finite differences (counted as
        forwards: cost is measured, not assumed).

        The result stays differentiable with respect to the parameters, so a loss may back-propagate through
        the tangent (LSD "convex" needs this, docs/methods.md §2.4).
        """
        n = primals[0].shape[0]
        kwargs = self.conditioning()
        with jvp_precision(self.jvp_config, primals[0]):
            if self.jvp_config.mode == "finite_difference":
                self.counts.forwards += 3 * n
                devices = [primals[0].device] if primals[0].device.type == "cuda" else []
                v, dv, unresolved = finite_difference_jvp(
                    lambda x, a, b: self.net(x, a, b, **kwargs), primals, tangents, self.jvp_config.eps, devices
                )
                self.counts.unresolved += unresolved
                return v, dv
            self.counts.jvps += n
            with tangent_attention():  # `forward`, not the module call: a compiled network's JVP runs uncompiled
                return exact_jvp(lambda x, a, b: self.net.forward(x, a, b, **kwargs), primals, tangents)
