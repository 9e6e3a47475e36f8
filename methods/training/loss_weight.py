"""The learned loss weight w(a, b) of the trainer (EDM2-style log-variance)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from orch.methods.networks.base import positional_embedding


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
