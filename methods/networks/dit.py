"""DiT/SiT transformers as flow-map networks v(x; a, b) for images and VAE latents (C, H, W).

The architecture and parameter names are DiT's (and SiT's, which shares them): a patch embedding, a fixed 2-D
sin-cos position embedding, blocks of self-attention and a GELU MLP each modulated by adaLN-Zero (shift, scale
and a gate regressed from the conditioning vector c, the regressing layers zero-initialised so every block starts
as the identity and the network outputs 0), and a final adaLN layer. What a flow map adds is a second time:

* `time_embedding: secant` (paper B's student): c = (E_t(a) + E_s(b)) / 2, so that with E_s a copy of E_t,
  v(x; t, t) is the SiT velocity network it was initialised from;
* `time_embedding: meanflow`: c = E_t(1 − a) + E_h(b − a), MeanFlow's embeddings of its time t (1 = noise)
  and of the jump length h = t − r, summed;

plus the class embedding E_y(y) (a row per class and one for the null class, DiT's layout) and, for paper B's
online CFG, a timestep-style embedder of the normalised guidance scale, E_ω(ω). Attention runs through torch's
scaled-dot-product kernels except inside forward-mode AD (methods/runtime/attention.py).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from orch.methods.contracts.guidance import ClassConditioning
from orch.methods.networks.base import MODELS, AttentionParams, guidance_input, unconditional
from orch.methods.runtime.attention import AttentionMode, QKNorm, attention
from orch.methods.runtime.precision import TimePrecision, at_least_fp32, full_precision, time_embedding_precision

SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
"""DiT's model sizes: (depth, hidden width, heads)."""
FREQUENCIES = 256
"""Sinusoidal features of a time before its embedder's MLP (DiT's frequency_embedding_size)."""


class DiTParams(AttentionParams):
    size: Literal["S", "B", "L", "XL"] = "S"
    """DiT's sizes: S (12 blocks, width 384, 6 heads), B (12, 768, 12), L (24, 1024, 16), XL (28, 1152, 16)."""
    patch: Literal[2, 4, 8] = 2
    """Patch side: the image side must be a multiple of it (DiT-XL/2 on 32×32 latents: 256 tokens)."""
    depth: PositiveInt | None = None
    """Blocks, overriding the size's (tiny models for tests and CPUs)."""
    hidden: PositiveInt | None = None
    """Width, overriding the size's; a multiple of 4 (the 2-D position embedding) and of the heads."""
    heads: PositiveInt | None = None
    """Attention heads, overriding the size's."""
    mlp_ratio: float = Field(4.0, gt=0.0)
    """Width of each block's MLP relative to the width."""
    time_embedding: Literal["secant", "meanflow", "decoupled"] = "secant"
    """`secant`: c = (E_t(a) + E_s(b)) / 2 (paper B); `meanflow`: c = E_t(1 − a) + E_h(b − a) (MeanFlow's t and
    t − r); `decoupled`: one embedder, the first `decoupled_blocks` blocks see E_t(a) and the rest and the final
    layer E_t(b) (DMF), so that at a = b the network is the flow model it was converted from."""
    decoupled_blocks: PositiveInt | None = None
    """Under `decoupled`, the blocks that see the start time a; null: ⌊5/7⌋ of the depth (DMF's 20 of 28)."""
    time_scale: float = Field(1.0, gt=0.0)
    """Times are multiplied by this before their sinusoidal features; 1 is SiT's (and paper B's) raw τ ∈ [0, 1]."""
    init_from: str | None = None
    """A checkpoint of the DiT or SiT repositories (e.g. SiT-XL-2-256.pt: a state dict, or one under "ema" or
    "model") the network starts from, of this size, patch and class count: a learned-variance output half is
    dropped, and the end-time embedder E_s is a copy of E_t (paper B's transfer, so v(x; t, t) starts as the
    checkpoint's velocity). null: DiT's initialisation."""

    @model_validator(mode="after")
    def width_splits(self) -> DiTParams:
        depth, hidden, heads = self.shape()
        if hidden % heads or hidden % 4:
            raise ValueError(f"width {hidden} must be a multiple of 4 and of the {heads} heads")
        if self.decoupled_blocks is not None and self.decoupled_blocks > depth:
            raise ValueError(f"decoupled_blocks {self.decoupled_blocks} is more than the depth {depth}")
        return self

    def start_blocks(self) -> int:
        """The blocks conditioned on the start time a: all but under `decoupled` time."""
        depth = self.shape()[0]
        if self.time_embedding != "decoupled":
            return depth
        return self.decoupled_blocks if self.decoupled_blocks is not None else depth * 5 // 7

    def shape(self) -> tuple[int, int, int]:
        """(depth, hidden, heads): the size's, with the overrides applied."""
        depth, hidden, heads = SIZES[self.size]
        return self.depth or depth, self.hidden or hidden, self.heads or heads


def timestep_features(t: Tensor, dim: int = FREQUENCIES, max_period: float = 10000.0) -> Tensor:
    """DiT's sinusoidal features of times t (n,): [cos(t·f_i), sin(t·f_i)], f_i = max_period^(−i/(dim/2));
    shape (n, dim), at least fp32."""
    half, dtype = dim // 2, at_least_fp32(t)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    angles = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class TimestepEmbedder(nn.Module):
    """A scalar per sample (a time, or a normalised guidance scale) → (n, hidden): sinusoidal features → Linear →
    SiLU → Linear, weights N(0, 0.02) (DiT's init)."""

    def __init__(self, hidden: int, precision: TimePrecision, frequencies: int = FREQUENCIES):
        super().__init__()
        self.precision = precision
        self.mlp = nn.Sequential(nn.Linear(frequencies, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, t: Tensor) -> Tensor:
        with time_embedding_precision(self.precision, t):  # fp32 under autocast by default
            return self.mlp(timestep_features(t, self.mlp[0].in_features))


class LabelEmbedder(nn.Module):
    """A learned vector per class and one for the null class (the last row, DiT's layout). Shape (n, hidden)."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """(n, C, H, W) → (n, H·W / p², hidden): one p × p stride-p convolution."""

    def __init__(self, channels: int, hidden: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, hidden, patch, stride=patch)
        nn.init.xavier_uniform_(self.proj.weight.view(hidden, -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm without affine parameters computed in fp32 by an explicit cast, which carries forward-mode
    tangents consistently under autocast (as GroupNorm32 in methods/networks/unet.py). Output fp32."""

    def __init__(self, hidden: int):
        super().__init__(hidden, elementwise_affine=False, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        with full_precision(x):
            return super().forward(x.to(at_least_fp32(x)))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (n, L, D) · (1 + scale) + shift, with shift and scale (n, D) per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention over the tokens, (n, L, D) → (n, L, D)."""

    def __init__(self, hidden: int, heads: int, mode: AttentionMode, qk_norm: bool):
        super().__init__()
        self.heads, self.mode = heads, mode
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.qk_norm = QKNorm(hidden // heads) if qk_norm else None

    def forward(self, x: Tensor) -> Tensor:
        n, length, hidden = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        return self.proj(attention(q, k, v, self.mode).transpose(1, 2).reshape(n, length, hidden))


class MLP(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, width), nn.Linear(width, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def zero_linear(hidden: int, out: int) -> nn.Sequential:
    """SiLU → Linear with zero weights and bias: adaLN-Zero's regression of shifts, scales and gates from c."""
    layer = nn.Linear(hidden, out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return nn.Sequential(nn.SiLU(), layer)


class DiTBlock(nn.Module):
    """x + gate·Attention(modulate(LN(x))), then x + gate·MLP(modulate(LN(x))), all six from c (adaLN-Zero)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, attention: AttentionMode, qk_norm: bool):
        super().__init__()
        self.norm1, self.attn = LayerNorm32(hidden), SelfAttention(hidden, heads, attention, qk_norm)
        self.norm2, self.mlp = LayerNorm32(hidden), MLP(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = zero_linear(hidden, 6 * hidden)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """modulate(LN(x)) → Linear to p² · C values per token, zero-initialised."""

    def __init__(self, hidden: int, patch: int, channels: int):
        super().__init__()
        self.norm_final = LayerNorm32(hidden)
        self.linear = nn.Linear(hidden, patch * patch * channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.adaLN_modulation = zero_linear(hidden, 2 * hidden)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """[sin(p·ω_i), cos(p·ω_i)] with ω_i = 10000^(−i/(dim/2)); (L,) → (L, dim), float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, side: int) -> Tensor:
    """DiT's fixed position embedding of a side × side token grid in row-major order, (side², dim): the first
    half embeds each token's column, the second its row."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1).float()


class FlowMapDiT(nn.Module):
    def __init__(self, shape: tuple[int, ...], params: DiTParams, conditioning: ClassConditioning | None = None):
        super().__init__()
        channels, side = shape[0], shape[1]
        depth, hidden, heads = params.shape()
        self.patch, self.channels, self.time_scale = params.patch, channels, params.time_scale
        self.time_embedding, self.start_blocks = params.time_embedding, params.start_blocks()
        self.x_embedder = PatchEmbed(channels, hidden, params.patch)
        self.register_buffer("pos_embed", sincos_2d(hidden, side // params.patch)[None])
        self.t_embedder = TimestepEmbedder(hidden, params.time_precision)
        if self.time_embedding == "meanflow":
            self.h_embedder = TimestepEmbedder(hidden, params.time_precision)
        elif self.time_embedding == "secant":
            self.s_embedder = TimestepEmbedder(hidden, params.time_precision)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden, heads, params.mlp_ratio, params.attention, params.qk_norm) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden, params.patch, channels)
        for block in self.blocks:  # DiT's init of the attention and MLP layers
            for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.y_embedder = LabelEmbedder(conditioning.num_classes, hidden) if conditioning else None
        self.cfg_embedder = (
            TimestepEmbedder(hidden, params.time_precision) if conditioning and conditioning.omega else None
        )
        self.interval_embedders = None
        if conditioning and conditioning.interval:  # one embedder per end of the guidance interval
            self.interval_embedders = nn.ModuleList(TimestepEmbedder(hidden, params.time_precision) for _ in range(2))

    def load_pretrained(self, saved: dict, source: str) -> None:
        """Take the weights of a DiT/SiT repository checkpoint (model.init_from, or a teacher's file)."""
        load_official(self, saved, source)

    def times(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """The time conditioning (n, hidden) of the start blocks and of the other blocks with the final layer:
        one vector for both except under decoupled time."""
        a, b = a * self.time_scale, b * self.time_scale
        if self.time_embedding == "meanflow":
            c = self.t_embedder(self.time_scale - a) + self.h_embedder(b - a)
        elif self.time_embedding == "secant":
            c = (self.t_embedder(a) + self.s_embedder(b)) / 2
        else:
            return self.t_embedder(a), self.t_embedder(b)
        return c, c

    def condition(
        self,
        a: Tensor,
        b: Tensor,
        labels: Tensor | None = None,
        omega: Tensor | None = None,
        interval: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The conditioning vectors c (n, hidden) of the start blocks and of the rest: the jump a → b, the class
        and the guidance inputs."""
        start, end = self.times(a, b)
        if self.y_embedder is None:
            unconditional(labels, omega, interval)
            return start, end
        if labels is None:
            raise ValueError("a class-conditional network needs labels (the null class for unconditional)")
        c = self.y_embedder(labels)
        if self.cfg_embedder is not None:
            c = c + self.cfg_embedder(guidance_input(omega, "omega"))
        if self.interval_embedders is not None:
            for embed, end_time in zip(self.interval_embedders, guidance_input(interval, "interval").unbind(1)):
                c = c + embed(end_time)
        return start + c, end + c

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """(n, L, p²·C) → (n, C, H, W)."""
        n, length, _ = tokens.shape
        p, side = self.patch, math.isqrt(length)
        x = tokens.reshape(n, side, side, p, p, self.channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, self.channels, side * p, side * p)

    def forward(
        self,
        x: Tensor,
        a: Tensor,
        b: Tensor,
        labels: Tensor | None = None,
        omega: Tensor | None = None,
        interval: Tensor | None = None,
    ) -> Tensor:
        """x (n, C, H, W), times a, b (n,), labels (n,), omega (n,), interval (n, 2) → average velocity (n, C, H, W)."""
        start, end = self.condition(a, b, labels, omega, interval)
        h = self.x_embedder(x) + self.pos_embed
        for i, block in enumerate(self.blocks):
            h = block(h, start if i < self.start_blocks else end)
        return self.unpatchify(self.final_layer(h, end))


OFFICIAL_CONTAINERS = ("ema", "model")
"""Where a training checkpoint of the DiT/SiT repositories keeps its state dict (released files are the dict)."""


def official_state(saved: dict, net: FlowMapDiT) -> dict[str, Tensor]:
    """A DiT/SiT repository state dict in `net`'s layout: the names are DiT's already; the final layer's rows of
    a learned-variance output (per pixel, C mean channels then C variance channels) are cut to the mean's, and
    a checkpoint with one time embedder gets E_s = E_t (paper B's transfer) for a secant network."""
    state = next((saved[k] for k in OFFICIAL_CONTAINERS if isinstance(saved.get(k), dict)), saved)
    state = dict(state)
    rows = net.patch**2 * net.channels
    means = torch.arange(2 * rows).reshape(net.patch**2, 2 * net.channels)[:, : net.channels].flatten()
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        if name in state and state[name].shape[0] == 2 * rows:
            state[name] = state[name][means]
    if net.time_embedding == "secant" and not any(k.startswith("s_embedder.") for k in state):
        state |= {"s_embedder." + k[len("t_embedder.") :]: v for k, v in state.items() if k.startswith("t_embedder.")}
    return state


def load_official(net: FlowMapDiT, saved: dict, source: str) -> None:
    """Load a DiT/SiT repository checkpoint (read from `source`) into `net` (official_state); a guidance embedder
    (ω, interval) the checkpoint has none of keeps its initialisation. Raises ValueError naming the file and the
    missing, unexpected or mis-shaped parameters."""
    state = official_state(saved, net)
    own = net.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (this network: {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and own[k].shape != v.shape]  # fmt: skip
    missing = [k for k in own if k not in state and not k.startswith(("cfg_embedder.", "interval_embedders."))]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        raise ValueError(
            f"{source} is not a checkpoint of this DiT: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}, other shapes {wrong or 'none'}"
        )
    net.load_state_dict(state, strict=False)


@MODELS.register("dit", DiTParams)
def build_dit(
    params: DiTParams, data_shape: tuple[int, ...], data_std: Tensor, conditioning: ClassConditioning | None = None
) -> FlowMapDiT:
    """DiT/SiT transformer for images or latents (C, H, W) with square sides divisible by the patch."""
    if len(data_shape) != 3 or data_shape[1] != data_shape[2] or data_shape[1] % params.patch:
        raise ValueError(
            f"model 'dit' needs square images or latents (C, H, W) with sides divisible by patch {params.patch}, "
            f"got shape {data_shape}"
        )
    return FlowMapDiT(data_shape, params, conditioning)
