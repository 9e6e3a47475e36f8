"""A UNet flow-map network v(x; a, b) for 28×28 to 64×64 images (docs/methods.md §3.5).

What is kept from paper A's network: the time conditioning (positional embeddings of the start time a and of
the jump length b − a, each through its own linear layer, averaged, then SiLU, modulating every residual block
FiLM-style with scale + 1 and shift), the σ_d preconditioning v = σ_d·UNet(x/σ_d) with a constant-one input
channel, a zero-initialised output (so v = 0 at initialisation), and the layout options (channels, multipliers,
blocks per resolution, attention resolutions, dropout) with which the paper's CIFAR-10 and CelebA-64 sizes are
set in the study files.

What differs: the blocks are the standard DDPM++/ADM kind (GroupNorm, SiLU, 3×3 convolutions, residual and skip
sums scaled by 1/√2, multi-head self-attention with 64 channels per head) rather than EDM2's magnitude-preserving
layers with forced weight normalisation. That design is what makes paper A's learning rate 1e−2 sane; with these
blocks the usual UNet learning rates (around 1e−4 to 2e−4 with Adam-type optimisers) apply, and the shipped
image studies set them. The standard blocks work with every method here, including the JVP-based ones.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from orch.methods.contracts.guidance import ClassConditioning
from orch.methods.networks.base import (
    MODELS,
    AttentionParams,
    ClassEmbedding,
    positional_embedding,
    unconditional,
)
from orch.methods.runtime.attention import AttentionMode, QKNorm, attention
from orch.methods.runtime.precision import at_least_fp32, full_precision, time_embedding_precision


class UNetParams(AttentionParams):
    channels: PositiveInt = 32
    """Base channel count (paper A: 128)."""
    channel_mult: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 2, 2]
    """Channel multiplier per resolution, highest resolution first; each level after the first halves it."""
    num_blocks: PositiveInt = 1
    """Residual blocks per resolution (paper A: 4 on CIFAR-10, 3 on CelebA-64)."""
    attn_resolutions: list[PositiveInt] = []
    """Resolutions (feature-map sides) with self-attention (paper A: [16] on CIFAR-10, [16, 8] on CelebA-64)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Dropout in the residual blocks."""
    emb_channels: PositiveInt | None = None
    """Width of the time embedding; null: 4 × channels."""
    time_scale: Annotated[float, Field(gt=0.0)] = 1.0
    """Times are multiplied by this before the positional embedding. 1 embeds raw a, b − a ∈ [0, 1] as paper
    A's code does; larger values (e.g. 1000, DDPM's scale) resolve nearby times better in short trainings."""


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 under autocast, by an explicit cast. Autocast's own fp32 cast of group_norm
    does not carry a forward-mode tangent along consistently (the next convolution then meets an fp32 tangent
    and bf16 weights, a dtype error in every JVP method), an explicit cast does. Output (N, C, H, W) in at least
    fp32."""

    def forward(self, x: Tensor) -> Tensor:
        with full_precision(x):
            return super().forward(x.to(at_least_fp32(x)))


def group_norm(channels: int) -> nn.GroupNorm:
    return GroupNorm32(math.gcd(32, channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, FiLM by the time embedding, GroupNorm → SiLU → dropout → conv; (skip + h)/√2."""

    def __init__(self, c_in: int, c_out: int, emb_channels: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_channels, 2 * c_out)
        self.norm2, self.dropout = group_norm(c_out), nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (scale + 1) + shift)
        h = self.conv2(self.dropout(h))
        return (self.skip(x) + h) / math.sqrt(2)


class Attention(nn.Module):
    """Multi-head self-attention over the pixels, 64 channels per head; (x + attn)/√2."""

    def __init__(self, channels: int, mode: AttentionMode, qk_norm: bool):
        super().__init__()
        self.heads, self.mode = max(1, channels // 64), mode
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))
        self.qk_norm = QKNorm(channels // self.heads) if qk_norm else None

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        out = attention(q, k, v, self.mode).transpose(-1, -2).reshape(n, c, h, w)
        return (x + self.proj(out)) / math.sqrt(2)


class Level(nn.Module):
    """The residual blocks (with attention where asked) of one resolution."""

    def __init__(
        self, channels: list[int], emb_channels: int, dropout: float, attention: AttentionMode | None, qk_norm: bool
    ):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c, channels[-1], emb_channels, dropout) for c in channels[:-1])
        self.attn = nn.ModuleList(
            Attention(channels[-1], attention, qk_norm) if attention else nn.Identity() for _ in channels[:-1]
        )


class FlowMapUNet(nn.Module):
    def __init__(
        self,
        shape: tuple[int, ...],
        data_std: Tensor,
        params: UNetParams,
        conditioning: ClassConditioning | None = None,
    ):
        super().__init__()
        c_img, side = shape[0], shape[1]
        ch, mult, emb_ch = params.channels, params.channel_mult, params.emb_channels or 4 * params.channels
        self.time_scale, self.time_precision = params.time_scale, params.time_precision
        self.register_buffer("data_std", data_std.clone().float().reshape(-1)[:1].reshape(()))
        self.emb_a, self.emb_len = nn.Linear(ch, emb_ch), nn.Linear(ch, emb_ch)
        self.emb_out = nn.Linear(emb_ch, emb_ch)
        self.conv_in = nn.Conv2d(c_img + 1, ch * mult[0], 3, padding=1)

        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, c, res = [ch * mult[0]], ch * mult[0], side
        for i, m in enumerate(mult):
            chans = [c] + [ch * m] * params.num_blocks
            self.down.append(
                Level(
                    chans,
                    emb_ch,
                    params.dropout,
                    params.attention if res in params.attn_resolutions else None,
                    params.qk_norm,
                )
            )
            c = ch * m
            skips += [c] * params.num_blocks
            if i < len(mult) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res = (res + 1) // 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb_ch, params.dropout), ResBlock(c, c, emb_ch, params.dropout)])
        self.mid_attn = Attention(c, params.attention, params.qk_norm)

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, m in reversed(list(enumerate(mult))):
            blocks = nn.ModuleList()
            for _ in range(params.num_blocks + 1):
                blocks.append(ResBlock(c + skips.pop(), ch * m, emb_ch, params.dropout))
                c = ch * m
            attn = nn.ModuleList(
                Attention(c, params.attention, params.qk_norm) if res in params.attn_resolutions else nn.Identity()
                for _ in range(params.num_blocks + 1)
            )
            self.up.append(nn.ModuleDict({"blocks": blocks, "attn": attn}))
            if i > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
                res *= 2
        self.norm_out = group_norm(c)
        self.conv_out = zero_init(nn.Conv2d(c, c_img, 3, padding=1))
        # created last, so that a conditional UNet's other weights start where the unconditional one's do
        self.classes = ClassEmbedding(conditioning, emb_ch) if conditioning else None

    def embed(self, a: Tensor, b: Tensor) -> Tensor:
        """Paper A's conditioning: PosEmb(a) and PosEmb(b − a), each through its own linear map, averaged."""
        ch = self.emb_a.in_features
        with time_embedding_precision(self.time_precision, a):  # fp32 under autocast by default
            ea = self.emb_a(positional_embedding(a * self.time_scale, ch))
            el = self.emb_len(positional_embedding((b - a) * self.time_scale, ch))
            return self.emb_out(F.silu((ea + el) / 2))

    def forward(
        self,
        x: Tensor,
        a: Tensor,
        b: Tensor,
        labels: Tensor | None = None,
        omega: Tensor | None = None,
        interval: Tensor | None = None,
    ) -> Tensor:
        emb = self.embed(a, b)
        if self.classes is not None:  # the class (and guidance) embedding is added to the time embedding
            with full_precision(emb):
                emb = emb + self.classes(labels, omega, interval)
        else:
            unconditional(labels, omega, interval)
        emb = F.silu(emb)
        ones = torch.ones_like(x[:, :1])
        h = self.conv_in(torch.cat([x / self.data_std, ones], dim=1))
        skips = [h]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attn):
                h = attn(block(h, emb))
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)
        h = self.mid[1](self.mid_attn(self.mid[0](h, emb)), emb)
        for i, level in enumerate(self.up):
            for block, attn in zip(level["blocks"], level["attn"]):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if i < len(self.upsample):
                h = F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest")
                h = self.upsample[i](h)
        return self.conv_out(F.silu(self.norm_out(h))) * self.data_std


@MODELS.register("unet", UNetParams)
def build_unet(
    params: UNetParams, data_shape: tuple[int, ...], data_std: Tensor, conditioning: ClassConditioning | None = None
) -> FlowMapUNet:
    """UNet for images (C, H, W), paper A's time conditioning and σ_d scaling, standard residual blocks."""
    if len(data_shape) != 3:
        raise ValueError(f"model 'unet' needs image data (C, H, W), got shape {data_shape}")
    return FlowMapUNet(data_shape, data_std, params, conditioning)
