"""The method contract: a method turns a batch into named regression terms; the trainer does the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from methods.registry import Registry


@dataclass
class Term:
    """One regression of a network output onto a target.

    Attributes:
        name: the term's name in metric keys (`train/loss/<name>`, `train/target_std/<name>`).
        pred: prediction with its graph, shape (n, *data_shape).
        target: regression target, shape (n, *data_shape); detached or not according to the stop-gradient
            setting (a target that keeps its graph is part of the gradient path).
        a, b: per-sample jump times (n,), used by learned weighting and per-time statistics.
    """

    name: str
    pred: Tensor
    target: Tensor
    a: Tensor
    b: Tensor

    def sq_error(self) -> Tensor:
        """Per-sample squared error summed over all data dimensions (not averaged), shape (n,)."""
        return (self.pred - self.target).pow(2).flatten(1).sum(1)

    def target_norms(self) -> Tensor:
        """Per-sample L2 norm of the (detached) target: paper B's loss-target variance is their batch std."""
        return self.target.detach().flatten(1).norm(dim=1)


class Method(Protocol):
    def terms(self, net: nn.Module, x1: Tensor, step: int, gen: torch.Generator) -> list[Term]: ...

    def sample(self, net: nn.Module, x0: Tensor, nfe: int) -> Tensor: ...


METHODS = Registry("method")
