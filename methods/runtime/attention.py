"""Scaled dot-product attention softmax(q kᵀ/√d) v, by one of three paths (`model.attention`):

* `math`: the explicit softmax in every pass; forward-mode AD derives the tangent op by op (O(L²) memory).
* `sdpa`: torch's fused kernels (flash, memory-efficient) in passes without forward-mode AD; in passes with it,
  which those kernels cannot serve, `SoftmaxWeights`: the softmax weights in fp32 with a forward-mode rule of
  their own (the same numbers as `math` in fp32/fp64; in half precision the scores and their tangent stay fp32).
* `jvp_kernel`: the `jvp-flash-attention` Triton kernel (a CUDA GPU and the package) in passes with forward-mode
  AD, the fused kernels elsewhere. Its backward ignores the tangent's cotangent: a loss that back-propagates
  through its JVP cannot use it (refused at validation).

`CountingNet.jvp` marks its forward-mode passes with `tangent_attention()`.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionMode = Literal["math", "sdpa", "jvp_kernel"]
JVP_KERNEL_PACKAGE = "jvp_flash_attention"
"""The module of the PyPI package jvp-flash-attention (the `gpu` extra)."""

_TANGENT: ContextVar[bool] = ContextVar("tangent_attention", default=False)


@contextmanager
def tangent_attention() -> Iterator[None]:
    """Inside: passes carry forward-mode tangents, which torch's fused kernels cannot."""
    token = _TANGENT.set(True)
    try:
        yield
    finally:
        _TANGENT.reset(token)


def attention(q: Tensor, k: Tensor, v: Tensor, mode: AttentionMode = "sdpa") -> Tensor:
    """softmax(q kᵀ / √d) v over the last two dims: q, k, v of shape (n, heads, L, d) → (n, heads, L, d)."""
    if mode == "math":
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
    if not _TANGENT.get():
        return F.scaled_dot_product_attention(q, k, v)
    if mode == "jvp_kernel":
        return jvp_kernel_attention(q, k, v)
    return SoftmaxWeights.apply(q, k) @ v


def jvp_kernel_problem() -> str | None:
    """Why `jvp_kernel` cannot run in this process (no CUDA GPU, or the package is missing), or None."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (the jvp-flash-attention kernel is Triton)"
    if importlib.util.find_spec(JVP_KERNEL_PACKAGE) is None:
        return "needs the jvp-flash-attention package: pip install 'orch[gpu]'"
    return None


def jvp_kernel_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The fused kernel's dual forward (inside torch.func.jvp it takes the tangents from the dual tensors)."""
    from jvp_flash_attention.jvp_attention import JVPAttn  # the optional `gpu` extra, checked at validation

    return JVPAttn.fwd_dual(q.contiguous(), k.contiguous(), v.contiguous())


def softmax_tangent(w: Tensor, ds: Tensor) -> Tensor:
    """The derivative of w = softmax(s) (last dim) along ds: w ⊙ (ds − Σ_k w ds); also softmax's backward."""
    return w * (ds - (w * ds).sum(dim=-1, keepdim=True))


class SoftmaxWeights(torch.autograd.Function):
    """w = softmax(q kᵀ / √d) over the keys, computed in (at least) fp32 and returned in q's dtype, with a
    backward and a forward-mode rule written out: q, k of shape (n, heads, L, d) → w of shape (n, heads, L, L).
    Both rules are built from differentiable operations, so a loss may back-propagate through the tangent."""

    @staticmethod
    def forward(q: Tensor, k: Tensor) -> Tensor:
        wide = torch.promote_types(q.dtype, torch.float32)
        scores = q.to(wide) @ k.to(wide).transpose(-1, -2) / math.sqrt(q.shape[-1])
        return torch.softmax(scores, dim=-1).to(q.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k = inputs
        ctx.save_for_backward(q, k, output)
        ctx.save_for_forward(q, k, output)

    @staticmethod
    def backward(ctx, dw: Tensor) -> tuple[Tensor, Tensor]:
        q, k, w = ctx.saved_tensors
        wide = torch.promote_types(q.dtype, torch.float32)
        ds = softmax_tangent(w.to(wide), dw.to(wide)) / math.sqrt(q.shape[-1])
        return (ds @ k.to(wide)).to(q.dtype), (ds.transpose(-1, -2) @ q.to(wide)).to(k.dtype)

    @staticmethod
    def jvp(ctx, dq: Tensor | None, dk: Tensor | None) -> Tensor:
        q, k, w = ctx.saved_tensors
        wide = torch.promote_types(q.dtype, torch.float32)
        ds = torch.zeros_like(w, dtype=wide)
        if dq is not None:
            ds = ds + dq.to(wide) @ k.to(wide).transpose(-1, -2)
        if dk is not None:
            ds = ds + q.to(wide) @ dk.to(wide).transpose(-1, -2)
        return softmax_tangent(w.to(wide), ds / math.sqrt(q.shape[-1])).to(q.dtype)


class QKNorm(nn.Module):
    """RMS normalisation of each head's queries and keys, with a learned scale per channel (`model.qk_norm`):
    bounds the attention logits, a remedy for JVP-trained transformers whose tangents blow up through them.
    Computed in at least fp32; q, k of shape (n, heads, L, d) → the same."""

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.q_scale, self.k_scale = nn.Parameter(torch.ones(head_dim)), nn.Parameter(torch.ones(head_dim))
        self.eps = eps

    def rms(self, x: Tensor, scale: Tensor) -> Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps) * scale).to(x.dtype)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.rms(q, self.q_scale), self.rms(k, self.k_scale)
