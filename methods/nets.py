"""Networks v(x; a, b) returning the average velocity of the jump a → b, and the learned loss weight."""

from __future__ import annotations

import math

import torch
from pydantic import PositiveInt
from torch import Tensor, nn

from methods.guidance import ClassConditioning
from methods.precision import full_precision
from methods.registry import Params, Registry

MODELS = Registry("model")


class MLPParams(Params):
    width: PositiveInt = 256
    """Units per hidden layer."""
    depth: PositiveInt = 4
    """Hidden GELU layers."""


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


class FlowMapMLP(nn.Module):
    """Paper A's checker network (docs/methods.md §3.5): input (a, b, x/σ), `depth` hidden GELU layers, output ×σ.

    Raw a and b are fed, not b − a, as in the paper's code. σ is the per-coordinate data std. A conditional
    MLP adds its class (and guidance) embedding to the first hidden layer's pre-activation, which is a linear
    map of a one-hot class input.
    """

    def __init__(
        self, dim: int, width: int, depth: int, data_std: Tensor, conditioning: ClassConditioning | None = None
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim + 2, width), nn.GELU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.GELU()]
        layers.append(nn.Linear(width, dim))
        self.layers = nn.Sequential(*layers)
        self.register_buffer("data_std", data_std.clone().float())
        # created last, so that a conditional MLP's other weights start where the unconditional one's do
        self.classes = ClassEmbedding(conditioning, width) if conditioning else None

    def forward(
        self, x: Tensor, a: Tensor, b: Tensor, labels: Tensor | None = None, omega: Tensor | None = None
    ) -> Tensor:
        with full_precision(x):  # the raw times a, b enter here: fp32 under autocast (methods/precision.py)
            h = self.layers[0](torch.cat([a[:, None], b[:, None], x.float() / self.data_std], dim=1))
            if self.classes is not None:
                h = h + self.classes(labels, omega)
            else:
                unconditional(labels, omega)
        return self.layers[1:](h) * self.data_std


@MODELS.register("mlp", MLPParams)
def build_mlp(
    params: MLPParams, data_shape: tuple[int, ...], data_std: Tensor, conditioning: ClassConditioning | None = None
) -> FlowMapMLP:
    """MLP for 2-D data (paper A's checker network)."""
    if len(data_shape) != 1:
        raise ValueError(f"model 'mlp' needs flat data, got shape {data_shape}")
    return FlowMapMLP(data_shape[0], params.width, params.depth, data_std, conditioning)


def positional_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of raw times t ∈ [0, 1], shape (n, dim), always in fp32."""
    t = t.float()
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
