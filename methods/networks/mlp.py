"""Paper A's MLP flow-map network v(x; a, b) for flat (2-D) data."""

from __future__ import annotations

import torch
from pydantic import PositiveInt
from torch import Tensor, nn

from orch.methods.contracts.guidance import ClassConditioning
from orch.methods.contracts.registry import Params
from orch.methods.networks.base import MODELS, ClassEmbedding, unconditional
from orch.methods.runtime.precision import at_least_fp32, full_precision


class MLPParams(Params):
    width: PositiveInt = 256
    """Units per hidden layer."""
    depth: PositiveInt = 4
    """Hidden GELU layers."""


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
        self,
        x: Tensor,
        a: Tensor,
        b: Tensor,
        labels: Tensor | None = None,
        omega: Tensor | None = None,
        interval: Tensor | None = None,
    ) -> Tensor:
        with full_precision(x):  # the raw times a, b enter here: fp32 under autocast (methods/runtime/precision.py)
            h = self.layers[0](torch.cat([a[:, None], b[:, None], x.to(at_least_fp32(x)) / self.data_std], dim=1))
            if self.classes is not None:
                h = h + self.classes(labels, omega, interval)
            else:
                unconditional(labels, omega, interval)
        return self.layers[1:](h) * self.data_std


@MODELS.register("mlp", MLPParams)
def build_mlp(
    params: MLPParams, data_shape: tuple[int, ...], data_std: Tensor, conditioning: ClassConditioning | None = None
) -> FlowMapMLP:
    """MLP for 2-D data (paper A's checker network)."""
    if len(data_shape) != 1:
        raise ValueError(f"model 'mlp' needs flat data, got shape {data_shape}")
    return FlowMapMLP(data_shape[0], params.width, params.depth, data_std, conditioning)
