"""Networks v(x; a, b) returning the average velocity of the jump a → b, and the learned loss weight."""

from __future__ import annotations

import math

import torch
from pydantic import PositiveInt
from torch import Tensor, nn

from methods.registry import Params, Registry

MODELS = Registry("model")


class MLPParams(Params):
    width: PositiveInt = 256
    """Units per hidden layer."""
    depth: PositiveInt = 4
    """Hidden GELU layers."""


class FlowMapMLP(nn.Module):
    """Paper A's checker network (docs/methods.md §3.5): input (a, b, x/σ), `depth` hidden GELU layers, output ×σ.

    Raw a and b are fed, not b − a, as in the paper's code. σ is the per-coordinate data std.
    """

    def __init__(self, dim: int, width: int, depth: int, data_std: Tensor):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim + 2, width), nn.GELU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.GELU()]
        layers.append(nn.Linear(width, dim))
        self.layers = nn.Sequential(*layers)
        self.register_buffer("data_std", data_std.clone().float())

    def forward(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        h = torch.cat([a[:, None], b[:, None], x / self.data_std], dim=1)
        return self.layers(h) * self.data_std


@MODELS.register("mlp", MLPParams)
def build_mlp(params: MLPParams, data_shape: tuple[int, ...], data_std: Tensor) -> FlowMapMLP:
    """MLP for 2-D data (paper A's checker network)."""
    if len(data_shape) != 1:
        raise ValueError(f"model 'mlp' needs flat data, got shape {data_shape}")
    return FlowMapMLP(data_shape[0], params.width, params.depth, data_std)


def positional_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of raw times t ∈ [0, 1], shape (n, dim)."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1) * math.sqrt(2)


class LogVarWeight(nn.Module):
    """Learned log-variance w(a, b) (EDM2-style, docs/methods.md §2.2): per-sample loss e^{−w}·ℓ + w.

    At the optimum e^w ≈ E[ℓ | a, b], which equalises the contribution of different jumps. Embeds raw a and b.
    Paper A applies one linear map to PosEmb(a) + PosEmb(b), which ties w to h(a) + h(b) with the same h; here
    each embedding has its own weights (w = f(a) + g(b)), which contains that form and can also express a loss
    scale that depends on a or b alone.
    """

    def __init__(self, channels: int = 128):
        super().__init__()
        self.channels = channels
        self.linear = nn.Linear(2 * channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        emb = torch.cat([positional_embedding(a, self.channels), positional_embedding(b, self.channels)], dim=1)
        return self.linear(emb).squeeze(1)
