"""Flow-map parameterisation X_{a,b}(x) = x + (b − a)·v(x; a, b) and the uniform N-step samplers (§2.2–2.3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from methods.interpolants import expand_time


def jump(net: nn.Module, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """X_{a,b}(x): one flow-map jump from time a to time b. X_{a,a} = id holds exactly."""
    return x + expand_time(b - a, x) * net(x, a, b)


def uniform_grid(n_steps: int, batch: int, device: torch.device) -> Tensor:
    """τ_k = k/N, k = 0..N, each repeated over the batch: shape (N + 1, batch)."""
    return torch.linspace(0, 1, n_steps + 1, device=device)[:, None].expand(-1, batch)


@torch.no_grad()
def sample_flow_map(net: nn.Module, x0: Tensor, n_steps: int) -> Tensor:
    """N jumps along the uniform grid: x ← X_{τ_k, τ_{k+1}}(x). NFE = N."""
    taus = uniform_grid(n_steps, x0.shape[0], x0.device)
    x = x0
    for k in range(n_steps):
        x = jump(net, x, taus[k], taus[k + 1])
    return x


@torch.no_grad()
def sample_euler(net: nn.Module, x0: Tensor, n_steps: int) -> Tensor:
    """Euler on the instantaneous velocity v(x; τ, τ) (the flow-map diagonal). NFE = N."""
    taus = uniform_grid(n_steps, x0.shape[0], x0.device)
    x = x0
    for k in range(n_steps):
        x = x + expand_time(taus[k + 1] - taus[k], x) * net(x, taus[k], taus[k])
    return x
