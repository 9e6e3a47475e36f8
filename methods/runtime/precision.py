"""Numerical precision of training and sampling: autocast regions, TF32, the fp16 loss scaler, and the regions
that always stay in fp32.

Master weights, optimiser state and EMA copies are always fp32; `bf16`/`fp16` only run the network's matrix
products and convolutions in half precision under autocast. The time (and guidance) embeddings and the loss
reduction run in fp32 (`full_precision`): half-precision times are a known source of instability for
JVP-trained flow maps (sCM, MeanFlow), since bf16 cannot tell t = 0.999 from t = 1. Every such cast promotes and
never demotes (`at_least_fp32`): a float64 network, as in the tests against closed forms, stays float64.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "tf32", "bf16", "fp16"]
TimePrecision = Literal["fp32", "autocast"]
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def at_least_fp32(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision tensors, their own dtype otherwise: casts promote, never demote (fp64 stays fp64,
    so that a float64 study or test carries no float32 rounding)."""
    return torch.promote_types(x.dtype, torch.float32)


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 on a GPU that supports it (fp16 on one that does not), fp32 on CPU. On CPU the reference
    studies are fp32 and autocast only pays on CPUs with bf16 units, so `auto` never changes a CPU result."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def set_matmul_precision(precision: str) -> None:
    """TF32 for the fp32 matrix products and convolutions unless the precision is strict `fp32` (process-wide;
    only affects Ampere or newer GPUs)."""
    allow = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast region of a training or sampling pass: half precision for `bf16`/`fp16`, none otherwise."""
    if precision not in HALF:
        return nullcontext()
    return torch.autocast(device.type, dtype=HALF[precision])


def full_precision(tensor: torch.Tensor) -> AbstractContextManager:
    """A region that stays fp32 inside an autocast pass (on `tensor`'s device): time embeddings, loss reductions."""
    return torch.autocast(tensor.device.type, enabled=False)


def time_embedding_precision(precision: TimePrecision, t: torch.Tensor) -> AbstractContextManager:
    """The region of a network's time (and guidance) embedding: fp32 under autocast (`fp32`), or the autocast
    of the rest of the pass (`autocast`, an ablation of that choice)."""
    return full_precision(t) if precision == "fp32" else nullcontext()


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """The dynamic loss scaler: on for fp16 only (bf16 has fp32's exponent range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
