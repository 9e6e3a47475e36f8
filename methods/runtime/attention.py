"""Scaled dot-product attention: torch's fused kernels where they can run, an exact differentiable path inside
forward-mode AD.

torch's fused kernels (flash, memory-efficient) have no forward-mode derivative, so a pass under torch.func.jvp
(LSD, ESD, MeanFlow, sCT/sCD) must take the explicit softmax path. `CountingNet.jvp` marks its passes with
`exact_attention()`; every other pass, with or without grad, takes `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor

_EXACT: ContextVar[bool] = ContextVar("exact_attention", default=False)


@contextmanager
def exact_attention() -> Iterator[None]:
    """Inside: `attention` takes the explicit softmax path (forward-mode AD passes through it)."""
    token = _EXACT.set(True)
    try:
        yield
    finally:
        _EXACT.reset(token)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √d) v over the last two dims: q, k, v of shape (n, heads, L, d) → (n, heads, L, d)."""
    if not _EXACT.get():
        return F.scaled_dot_product_attention(q, k, v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v
