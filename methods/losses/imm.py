"""Inductive Moment Matching (IMM) (docs/methods.md, "IMM").

A jump a → b is trained so that it carries the distribution of I_a onto that of I_b, not so that it matches a
per-sample target: groups of M samples share times a < ρ ≤ b, the model jumps each I_a^i to b (with grad) and a
detached copy jumps the same pair's I_ρ^i to b, and the loss is a kernel MMD² between the two groups of particles.
ρ is one step closer to b than a on the noise-to-signal scale, so the model learns long jumps by induction from
shorter ones (ρ = b gives exact samples of I_b, since X_{b,b} is the identity). The loss is reconstructed from
third-party implementations (the official code has none): every choice is an option.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, model_validator
from torch import Tensor, nn

from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.flow_map import jump
from orch.methods.contracts.interpolants import expand_time
from orch.methods.contracts.method import Method, MethodParams, Term, register_method
from orch.methods.runtime.parallel import Gen, rand


def noise_to_signal(t: Tensor | float) -> Tensor | float:
    """η(t) = t/(1 − t) in IMM's time (t = 1 noise)."""
    return t / (1 - t)


def imm_times(n_groups: int, gen: Gen, t_min: float, t_max: float, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per group (a, ρ, b), canonical: t ~ U(ε, T), s ~ U(ε, t), r = max(s, η⁻¹(η(t) − Δη)) with
    Δη = (η(T) − η(ε))/2^k, then a = 1 − t, ρ = 1 − r, b = 1 − s. Shapes (n_groups,)."""
    t = t_min + (t_max - t_min) * rand(gen, n_groups)
    s = t_min + (t - t_min) * rand(gen, n_groups)
    step = (noise_to_signal(t_max) - noise_to_signal(t_min)) / 2**k
    shifted = noise_to_signal(t) - step
    r = torch.maximum(s, shifted / (1 + shifted))
    return 1 - t, 1 - r, 1 - s


def time_weight(a: Tensor, bias: float, power: float) -> Tensor:
    """The sigmoid weighting w = σ(b_w − λ)·a^(p − 1)/((1 − a)(a² + (1 − a)²)), λ = 2 log(a/(1 − a)) the log-SNR
    at the jump's start. Shape of a."""
    snr = 2 * torch.log(a / (1 - a))
    return torch.sigmoid(bias - snr) * a ** (power - 1) / ((1 - a) * (a**2 + (1 - a) ** 2))


def kernel_scale(a: Tensor, b: Tensor, sigma_data: float) -> Tensor:
    """w̃ = 1/((b − a)σ_d), the kernel's inverse length for the jump (a, b) of the flow-map parameterisation. A
    float32 draw can give s = t (b = a): the length is floored at 1e-6, as an infinite w̃ makes the gradient NaN.
    Shape of a."""
    return 1 / ((b - a).clamp(min=1e-6) * sigma_data)


def laplace_kernel(u: Tensor, v: Tensor, scale: Tensor, eps: float) -> Tensor:
    """k(u_i, v_j) = exp(−scale·max(‖u_i − v_j‖, ε)/D) for every pair of a group, shape (G, M, M). The distance is
    √max(‖·‖², ε²), whose gradient stays finite at u_i = v_j. Shapes: u, v (G, M, D); scale (G,)."""
    sq = (u[:, :, None, :] - v[:, None, :, :]).pow(2).sum(-1)
    distance = sq.clamp(min=eps**2).sqrt()
    return torch.exp(-scale[:, None, None] * distance / u.shape[-1])


def group_mmd(y: Tensor, y_hat: Tensor, scale: Tensor, eps: float, statistic: str) -> Tensor:
    """MMD² between the particles y (with grad) and ŷ of each group: the V-statistic (1/M²)Σ_ij[k(y_i, y_j) +
    k(ŷ_i, ŷ_j) − k(y_i, ŷ_j) − k(y_j, ŷ_i)], or the U-statistic (i ≠ j, over M(M − 1)). Shapes: y, y_hat (G, M, D);
    scale (G,); returns (G,)."""
    pairs = (
        laplace_kernel(y, y, scale, eps)
        + laplace_kernel(y_hat, y_hat, scale, eps)
        - laplace_kernel(y, y_hat, scale, eps)
        - laplace_kernel(y_hat, y, scale, eps)
    )
    m = y.shape[1]
    if statistic == "u":
        off = ~torch.eye(m, dtype=torch.bool, device=y.device)
        return pairs[:, off].sum(-1) / (m * (m - 1))
    return pairs.sum((1, 2)) / m**2


class SkipParameterisation(nn.Module):
    """IMM's "simple EDM" parameterisation in orch's time: v(x; a, b) = (2a − 1)/(a² + (1 − a)²)·x +
    σ_d/√(a² + (1 − a)²)·F(x; a, b), F the network (the skip term lets the jump keep x where the signal
    dominates)."""

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data

    def forward(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        norm = a**2 + (1 - a) ** 2
        skip, out = (2 * a - 1) / norm, self.sigma_data / norm.sqrt()
        return expand_time(skip, x) * x + expand_time(out, x) * self.net(x, a, b)


class IMMParams(MethodParams):
    group_size: Annotated[int, Field(ge=2, le=4096)] = 4
    """M, the particles per group sharing (a, ρ, b); it must divide the batch."""
    t_max: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.994
    """T: the noisiest start in IMM's time (t = 1 noise); sampling starts there."""
    t_min: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.006
    """ε: the cleanest end (CIFAR-10 0.006, ImageNet 0); sampling ends there."""
    mapping_k: Annotated[int, Field(ge=0, le=30)] = 12
    """k: ρ is 1/2^k of the noise-to-signal range closer to b than a (unpublished; third parties use 12–15)."""
    weight_bias: float = 4.0
    """b_w of the sigmoid weighting (unpublished; third parties use 4 or 5)."""
    weight_power: NonNegativeFloat = 1.0
    """p of the weighting's a^(p − 1) (the released checkpoints: 1 with the "identity" time embedding, 2 with
    "stride")."""
    kernel_eps: PositiveFloat = 1e-8
    """ε of the kernel distance max(‖·‖, ε)."""
    statistic: Literal["v", "u"] = "v"
    """v: the biased V-statistic (it includes each particle's pull to its own pair); u: the unbiased U-statistic."""
    target: Literal["live", "ema"] = "live"
    """Whose detached jump makes ŷ: live = the current weights (both third-party versions), ema = the first EMA
    copy."""
    parameterisation: Literal["flow_map", "skip"] = "flow_map"
    """flow_map: v is the network (IMM's Euler-FM, ImageNet); skip: IMM's simple-EDM skip connection (CIFAR-10)."""

    @model_validator(mode="after")
    def times_ordered(self):
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min ({self.t_min:g}) must be below t_max ({self.t_max:g})")
        return self


@register_method("imm")
class IMM(Method):
    """Inductive moment matching: a Laplace-kernel MMD² between groups of jumped particles and detached jumps from
    one step closer; no JVP. Sampled by N jumps from t = T to t = ε (IMM's push-forward sampler).

    L. Zhou, S. Ermon, J. Song, "Inductive Moment Matching", ICML 2025, arXiv:2503.07565.
    """

    Params, own_times = IMMParams, True

    @classmethod
    def train_problems(cls, params: IMMParams, train: dict) -> list[tuple[str, str]]:
        rows = train["batch_size"] // train["micro_batches"]
        if rows % params.group_size:
            return [
                (
                    "method.group_size",
                    f"{params.group_size} does not divide the micro-batch of {rows} rows (train.batch_size "
                    f"{train['batch_size']} / train.micro_batches {train['micro_batches']})",
                )
            ]
        return []

    def expected_passes(self, batch: int) -> tuple[float, float]:
        return 2.0, 0.0  # the particle's jump (grad), its detached target jump

    def parameterised(self, net: nn.Module) -> nn.Module:
        if self.params.parameterisation == "skip":
            return SkipParameterisation(net, self.setting.sigma_data)
        return net

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        p, n, interpolant = self.params, x1.shape[0], self.setting.interpolant
        if n % p.group_size:
            raise ValueError(f"method.group_size {p.group_size} does not divide this worker's {n} rows")
        groups = n // p.group_size
        x0 = interpolant.sample_base(n, x1.shape[1:], gen)
        a, rho, b = (t.repeat_interleave(p.group_size) for t in imm_times(groups, gen, p.t_min, p.t_max, p.mapping_k))
        target_net = self.setting.ema_target if p.target == "ema" else net
        y = jump(self.parameterised(net), interpolant.interpolate(x0, x1, a), a, b)
        with torch.no_grad():
            y_hat = jump(self.parameterised(target_net), interpolant.interpolate(x0, x1, rho), rho, b)
        grouped = (y.reshape(groups, p.group_size, -1), y_hat.reshape(groups, p.group_size, -1))
        a_g, b_g = a[:: p.group_size], b[:: p.group_size]
        scale = kernel_scale(a_g, b_g, self.setting.sigma_data)
        loss = time_weight(a_g, p.weight_bias, p.weight_power) * group_mmd(*grouped, scale, p.kernel_eps, p.statistic)
        return [Term("imm", y, y_hat, a, b, custom=loss.repeat_interleave(p.group_size))]

    @torch.no_grad()
    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: Gen) -> Tensor:
        """N jumps on the uniform grid from a = 1 − T to 1 − ε, starting from base noise at a = 1 − T."""
        p, net = self.params, self.parameterised(net)
        grid = torch.linspace(1 - p.t_max, 1 - p.t_min, nfe + 1, device=x0.device)
        x = x0
        for k in range(nfe):
            a, b = grid[k].expand(len(x)), grid[k + 1].expand(len(x))
            x = jump(net, x, a, b)
        return x
