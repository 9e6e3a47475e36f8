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


def scalar_embedder(dim: int, frequencies: int) -> nn.Sequential:
    """A timestep-style embedder of one scalar per sample: sinusoidal features → Linear → SiLU → Linear, weights
    N(0, 0.02), biases zero, the last layer not zeroed (docs/methods.md §4)."""
    embedder = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))
    for layer in embedder[0], embedder[2]:
        nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(layer.bias)
    return embedder


class ClassEmbedding(nn.Module):
    """E_y(y) + E_ω(ω) + E_lo(τ_lo) + E_hi(τ_hi): a learned vector per class plus one for the null class and, under
    online CFG, a scalar embedder of the normalised guidance scale (and of each end of the guidance interval).
    Shape (n, dim)."""

    def __init__(self, conditioning: ClassConditioning, dim: int, frequencies: int = 128):
        super().__init__()
        self.labels = nn.Embedding(conditioning.num_classes + 1, dim)
        self.omega = scalar_embedder(dim, frequencies) if conditioning.omega else None
        self.interval = None
        if conditioning.interval:
            self.interval = nn.ModuleList(scalar_embedder(dim, frequencies) for _ in range(2))

    def forward(self, labels: Tensor | None, omega: Tensor | None, interval: Tensor | None) -> Tensor:
        if labels is None:
            raise ValueError("a class-conditional network needs labels (the null class for unconditional)")
        emb = self.labels(labels)
        if self.omega is not None:
            emb = emb + self.omega(positional_embedding(guidance_input(omega, "omega"), self.omega[0].in_features))
        if self.interval is not None:
            ends = guidance_input(interval, "interval").unbind(1)
            for embed, end in zip(self.interval, ends):
                emb = emb + embed(positional_embedding(end, embed[0].in_features))
        return emb


def guidance_input(value: Tensor | None, name: str) -> Tensor:
    """A guidance input the network was built to embed; a clear error when the caller left it out."""
    if value is None:
        raise ValueError(f"a network trained with online CFG needs its guidance input {name}")
    return value


def unconditional(labels: Tensor | None, omega: Tensor | None, interval: Tensor | None) -> None:
    if labels is not None or omega is not None or interval is not None:
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
