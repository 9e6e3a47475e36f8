"""The network registry and what every flow-map network shares: time and class embeddings."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from orch.methods.contracts.guidance import ClassConditioning
from orch.methods.contracts.registry import Params, Registry
from orch.methods.runtime.attention import AttentionMode
from orch.methods.runtime.precision import TimePrecision, at_least_fp32

MODELS = Registry("model")


class ClassEmbedding(nn.Module):
    """E_y(y) + E_ω(ω): a learned vector per class plus one for the null class, and for paper B's online CFG a
    timestep-style embedder of the normalised guidance scale (sinusoidal features → Linear → SiLU → Linear,
    weights N(0, 0.02), biases zero, the last layer not zeroed, docs/methods.md §4). Shape (n, dim)."""

    def __init__(self, conditioning: ClassConditioning, dim: int, frequencies: int = 128):
        super().__init__()
        self.labels = nn.Embedding(conditioning.num_classes + 1, dim)
        self.omega = None
        if conditioning.omega:
            self.omega = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))
            for layer in self.omega[0], self.omega[2]:
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, labels: Tensor | None, omega: Tensor | None) -> Tensor:
        if labels is None:
            raise ValueError("a class-conditional network needs labels (the null class for unconditional)")
        emb = self.labels(labels)
        if self.omega is not None:
            if omega is None:
                raise ValueError("a network trained with online CFG needs its guidance input omega")
            emb = emb + self.omega(positional_embedding(omega, self.omega[0].in_features))
        return emb


def unconditional(labels: Tensor | None, omega: Tensor | None) -> None:
    if labels is not None or omega is not None:
        raise ValueError("labels given to a network built without class conditioning (set dataset.conditional)")


def positional_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of raw times t ∈ [0, 1], shape (n, dim), in at least fp32."""
    t = t.to(at_least_fp32(t))
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1) * math.sqrt(2)


class AttentionParams(Params):
    """Options of the networks with attention and learned time embeddings (DiT, UNet): how the JVP methods'
    passes through them are computed (docs/methods.md §2.4)."""

    attention: AttentionMode = "sdpa"
    """How attention is computed: `sdpa` torch's fused kernels, with an exact forward-mode rule in JVP passes;
    `math` the explicit softmax everywhere; `jvp_kernel` the jvp-flash-attention kernel in JVP passes (a CUDA GPU
    and `pip install 'orch[gpu]'`)."""
    time_precision: TimePrecision = "fp32"
    """The time (and guidance) embedding under bf16/fp16 training: `fp32` (autocast off there) or `autocast` (its
    products in half precision like the rest of the network), a stability knob for JVP methods."""
    qk_norm: bool = False
    """RMS-normalise each head's queries and keys (learned scale): bounded attention logits, for JVP-trained
    models whose tangents blow up through attention (DMF's and TVM's choice)."""
