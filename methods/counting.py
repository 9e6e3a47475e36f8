"""One wrapper for every network evaluation, so cost per training sample is measured rather than assumed."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

# torch.func's first JVP calls torch.jit.script internally, which warns on every process start: not ours to fix.
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated")


class Counts:
    """Network evaluations weighted by batch size; shared by every wrapper of one trainer (student, EMA copy,
    teacher), so a training sample's cost includes its teacher's evaluations."""

    def __init__(self) -> None:
        self.forwards = 0
        self.jvps = 0


class CountingNet(nn.Module):
    """Wraps a network v(x; a, b) and counts its evaluations.

    `forwards` counts plain forward passes (with or without grad), `jvps` counts forward-mode passes (each
    also yields the primal output, so it is not counted as a forward as well). The trainer divides both by the
    number of training samples to get `cost/fwd_per_sample` and `cost/jvp_per_sample`.
    """

    def __init__(self, net: nn.Module, counts: Counts | None = None):
        super().__init__()
        self.net = net
        self.counts = counts or Counts()

    @property
    def forwards(self) -> int:
        return self.counts.forwards

    @property
    def jvps(self) -> int:
        return self.counts.jvps

    def forward(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        self.counts.forwards += x.shape[0]
        return self.net(x, a, b)

    def jvp(
        self, primals: tuple[Tensor, Tensor, Tensor], tangents: tuple[Tensor, Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """(v, dv): v(x; a, b) and its directional derivative along (dx, da, db), in one forward-mode pass.

        The result stays differentiable with respect to the parameters, so a loss may back-propagate through
        the tangent (LSD "convex" needs this, docs/methods.md §2.4).
        """
        self.counts.jvps += primals[0].shape[0]
        return torch.func.jvp(self.net, primals, tangents)
