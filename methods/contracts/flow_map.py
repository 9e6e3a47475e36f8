"""Flow-map parameterisation X_{a,b}(x) = x + (b − a)·v(x; a, b) and the uniform N-step samplers (§2.2–2.3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from orch.methods.contracts.interpolants import expand_time
from orch.methods.runtime.parallel import Gen, randn


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


@torch.no_grad()
def sample_heun(net: nn.Module, x0: Tensor, nfe: int) -> Tensor:
    """Heun (EDM-style) on the diagonal velocity with exactly `nfe` evaluations: ⌈nfe/2⌉ uniform steps, each a
    predictor and a corrector, except that the last step skips its corrector when nfe is odd (EDM's 2N − 1
    convention; nfe = 1 is one Euler step). With an even nfe every step is a full Heun step (2N)."""
    n_steps = (nfe + 1) // 2
    taus = uniform_grid(n_steps, x0.shape[0], x0.device)
    x = x0
    for k in range(n_steps):
        h = expand_time(taus[k + 1] - taus[k], x)
        v = net(x, taus[k], taus[k])
        predicted = x + h * v
        if k == n_steps - 1 and nfe % 2 == 1:
            x = predicted
        else:
            x = x + h / 2 * (v + net(predicted, taus[k + 1], taus[k + 1]))
    return x


@torch.no_grad()
def sample_consistency(net: nn.Module, x0: Tensor, n_steps: int, tau_min: float, base_std: Tensor, gen: Gen) -> Tensor:
    """Multistep consistency sampling (sCT, sCD, iCT) with the flow map to data, f(I_τ) = X_{τ,1}(I_τ), on the
    uniform grid of N times from τ_min (the largest noise level) towards 1. NFE = N. Shapes: x0 (n, *data_shape).
    """
    taus = tau_min + (1 - tau_min) * torch.arange(n_steps, dtype=torch.float64) / n_steps
    return sample_consistency_at(net, x0, taus.tolist(), base_std, gen)


@torch.no_grad()
def sample_consistency_at(net: nn.Module, x0: Tensor, taus: list[float], base_std: Tensor, gen: Gen) -> Tensor:
    """Consistency sampling through the increasing times `taus`: starts at taus[0] with I = (1 − τ)·x0 (the data
    part is negligible there), jumps to data, and re-noises to the next time with fresh base noise drawn from
    `gen` (the evaluation's generator, so that every chunk of samples gets its own noise and a seeded evaluation
    is reproducible). NFE = len(taus). Shapes: x0 (n, *data_shape)."""
    ones = torch.ones(x0.shape[0], device=x0.device)
    x = (1 - taus[0]) * x0
    for k, tau in enumerate(taus):
        data = jump(net, x, tau * ones, ones)
        if k + 1 < len(taus):
            noise = randn(gen, len(x0), *x0.shape[1:], device=x0.device) * base_std.to(x0.device)
            x = (1 - taus[k + 1]) * noise + taus[k + 1] * data
    return data
