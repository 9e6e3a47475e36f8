"""Exponential moving averages of the weights, one copy per decay (paper A tracks 0.999 and 0.9999)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """EMA copies of a network. Decay at step k is min(δ, (1 + k)/(10 + k)) so early averages are not dominated
    by the random initialisation (a common warm-up; negligible once k ≫ 1/(1 − δ))."""

    def __init__(self, net: nn.Module, decays: list[float]):
        self.nets = {}
        for decay in decays:
            self.add(net, decay)

    def add(self, net: nn.Module, decay: float) -> None:
        """A new copy of `net` averaged with `decay` from now on."""
        self.nets[decay] = copy.deepcopy(net).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        params = list(net.parameters())
        for decay, ema_net in self.nets.items():
            d = min(decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema_net.parameters()), params, 1 - d)

    def state_dict(self) -> dict[str, dict]:
        return {str(d): m.state_dict() for d, m in self.nets.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for d, m in self.nets.items():
            m.load_state_dict(state[str(d)])
