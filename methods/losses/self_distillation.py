"""Paper A's self-distillation of flow maps: LSD, ESD, PSD-M, PSD-U (docs/methods.md §3).

Each method is the flow-matching diagonal plus one off-diagonal residual on jumps (a, b) from the upper
triangle, written as a (prediction, target) term. The stop-gradient placement decides which parts of the target
keep their graph (§3.2); `convex`/`full` targets are computed under no_grad, so they also cost no activations.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.flow_map import sample_flow_map
from orch.methods.contracts.guidance import rows_of
from orch.methods.contracts.interpolants import expand_time
from orch.methods.contracts.method import Method, MethodParams, Setting, Term, register_method
from orch.methods.contracts.teacher import Velocity
from orch.methods.contracts.time_samplers import TimeSamplerParams, Uniform
from orch.methods.losses.flow_matching import diagonal_term
from orch.methods.runtime.parallel import Gen, rand, split_count

DiagFraction = Annotated[float, Field(ge=0.0, le=1.0)]


def _graph_if(keep_graph: bool):
    return nullcontext() if keep_graph else torch.no_grad()


def own_diagonal(net: CountingNet) -> Velocity:
    return lambda x, t: net(x, t, t)


def lsd_term(
    net: CountingNet, x: Tensor, a: Tensor, b: Tensor, stopgrad: str, velocity: Velocity | None = None
) -> Term:
    """Lagrangian: ∂_b X_{a,b}(x) regressed onto b̂(X_{a,b}(x), b), the velocity at the landing point (default:
    the network's own diagonal).

    ∂_b X_{a,b} = v + (b − a)·∂_b v comes from one JVP with tangent (0, 0, 1) and keeps its graph (the gradient
    flows through the JVP). `convex` detaches the teacher input and output; `none` keeps both.
    """
    zeros = torch.zeros_like(a)
    v, dv_db = net.jvp((x, a, b), (torch.zeros_like(x), zeros, torch.ones_like(b)))
    h = expand_time(b - a, x)
    x_b = x + h * v
    with _graph_if(stopgrad == "none"):
        target = (velocity or own_diagonal(net))(x_b if stopgrad == "none" else x_b.detach(), b)
    return Term("lsd", v + h * dv_db, target, a, b)


def esd_term(
    net: CountingNet, x: Tensor, a: Tensor, b: Tensor, stopgrad: str, velocity: Velocity | None = None
) -> Term:
    """Eulerian: ∂_a X_{a,b}(x) regressed onto −∇_x X_{a,b}(x)·b̂, b̂ = b̂(x, a) (default: the network's own
    diagonal v(x; a, a)).

    ∂_a X = −v + (b − a)·∂_a v (JVP with tangent (0, 1, 0), with grad); ∇_x X·b̂ = b̂ + (b − a)·∇_x v·b̂ (JVP with
    tangent (b̂, 0, 0)). `full`: b̂ and the spatial JVP detached (Algorithm 3); `convex`: only b̂ detached, the
    gradient flows through the spatial Jacobian; `none`: nothing detached.
    """
    zeros = torch.zeros_like(a)
    with _graph_if(stopgrad == "none"):
        b_hat = (velocity or own_diagonal(net))(x, a)
    v, dv_da = net.jvp((x, a, b), (torch.zeros_like(x), torch.ones_like(a), zeros))
    h = expand_time(b - a, x)
    with _graph_if(stopgrad != "full"):
        _, dv_dx = net.jvp((x, a, b), (b_hat, zeros, zeros))
        target = -(b_hat + h * dv_dx)
    return Term("esd", -v + h * dv_da, target, a, b)


def psd_term(net: CountingNet, x: Tensor, a: Tensor, b: Tensor, gamma: Tensor, stopgrad: str) -> Term:
    """Progressive (semigroup): v(x; a, b) regressed onto (1 − γ)·v(x; a, u) + γ·v(X_{a,u}(x); u, b).

    u = γa + (1 − γ)b, so (u − a) = (1 − γ)(b − a) and the semigroup X_{a,b} = X_{u,b}∘X_{a,u} divided by (b − a)
    gives the target. The residual is on v, not X ("PSD scaling"). `convex` detaches both teacher jumps.
    """
    u = gamma * a + (1 - gamma) * b
    pred = net(x, a, b)
    with _graph_if(stopgrad == "none"):
        v_au = net(x, a, u)
        x_u = x + expand_time(u - a, x) * v_au
        target = expand_time(1 - gamma, x) * v_au + expand_time(gamma, x) * net(x_u, u, b)
    return Term("psd", pred, target, a, b)


class LSDParams(MethodParams):
    stopgrad: Literal["convex", "none"] = "convex"
    """Which parts of the target keep their graph (docs/methods.md §3.2): convex detaches the teacher's input and
    output (paper A's runs); none keeps both."""
    diag_fraction: DiagFraction = 0.75
    """η: the first ⌊ηB⌋ samples of a batch train the diagonal (flow matching), the rest the residual."""


class ESDParams(LSDParams):
    stopgrad: Literal["full", "convex", "none"] = "full"
    """full detaches b̂ and the spatial JVP (Algorithm 3, paper A's runs); convex only b̂ (the gradient flows
    through the spatial Jacobian); none nothing."""


class PSDParams(LSDParams):
    stopgrad: Literal["convex", "none"] = "convex"
    """convex detaches both teacher jumps (paper A's runs); none keeps their graph."""


PAPER_A = """N. M. Boffi, M. S. Albergo, E. Vanden-Eijnden, "How to build a consistency model: Learning flow maps via
    self-distillation", NeurIPS 2025, arXiv:2505.18825."""


class SelfDistillation(Method):
    """Diagonal flow matching on the first ⌊ηM⌋ samples of a batch, an off-diagonal residual on the rest.

    η = `diag_fraction` (0.75 in paper A). Each off-diagonal sample gets its own fresh base sample x0; the split
    is of the batch, not a resampling (§3.1). Sampling: the uniform N-step flow-map sampler, NFE = N.
    """

    Params = LSDParams

    def __init__(self, params: LSDParams, setting: Setting):
        super().__init__(params, setting)
        self.time_sampler = setting.time_sampler or Uniform(TimeSamplerParams())

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        n, interpolant = x1.shape[0], self.setting.interpolant
        n_diag = self.diagonal_rows(n, step, gen)
        x0 = interpolant.sample_base(n, x1.shape[1:], gen)
        terms = []
        if n_diag:
            with rows_of(net, slice(None, n_diag)):
                terms.append(self.diagonal(net, x0[:n_diag], x1[:n_diag], self.time_sampler.diagonal(n_diag, gen)))
        if n_diag < n:
            a, b = self.time_sampler.offdiagonal(n - n_diag, step, gen)
            x_a = interpolant.interpolate(x0[n_diag:], x1[n_diag:], a)
            with rows_of(net, slice(n_diag, None)):
                terms.append(self.offdiagonal(net, x_a, a, b, gen))
        return terms

    def diagonal_rows(self, n: int, step: int, gen: Gen) -> int:
        """How many of the batch's first rows train the diagonal: ⌊ηn⌋, at least one (all of them during the
        time sampler's diagonal-only curriculum)."""
        if self.time_sampler.diagonal_only(step):
            return n
        return split_count(gen, n, self.diagonal_count)

    def diagonal_count(self, batch: int) -> int:
        """⌊η·batch⌋ diagonal rows, at least one."""
        return min(batch, max(1, int(batch * self.params.diag_fraction)))

    def diagonal(self, net: CountingNet, x0: Tensor, x1: Tensor, t: Tensor) -> Term:
        """The diagonal (boundary) term at times t: flow matching. Shapes: x0, x1 (n, *data_shape); t (n,)."""
        return diagonal_term(net, self.setting.interpolant, x0, x1, t)

    def offdiagonal(self, net: CountingNet, x_a: Tensor, a: Tensor, b: Tensor, gen: Gen) -> Term:
        """The method's residual on jumps (a, b) from x_a = I_a. Shapes: x_a (n, *data_shape); a, b (n,)."""
        raise NotImplementedError

    residual_passes: tuple[int, int]
    """(forward, JVP) evaluations of one off-diagonal sample (docs/methods.md §3.4)."""

    def expected_passes(self, batch: int) -> tuple[float, float]:
        """After any diagonal-only curriculum: one forward per diagonal sample, the residual's on the rest."""
        diagonal = self.diagonal_count(batch)
        forward, jvp = self.residual_passes
        return (diagonal + forward * (batch - diagonal)) / batch, jvp * (batch - diagonal) / batch

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: Gen) -> Tensor:
        return sample_flow_map(net, x0, nfe)


@register_method("lsd")
class LSD(SelfDistillation):
    __doc__ = f"""Lagrangian self-distillation (paper A, Algorithm 2): ∂_b X_{{a,b}} = v(X_{{a,b}}; b, b).

    {PAPER_A}
    """

    residual_passes = (1, 1)  # forward+JVP along b with its graph (counted as the JVP), the teacher's forward

    @classmethod
    def backpropagates_jvp(cls, params: LSDParams) -> bool:
        return True  # ∂_b X is the prediction

    def offdiagonal(self, net: CountingNet, x_a: Tensor, a: Tensor, b: Tensor, gen: Gen) -> Term:
        return lsd_term(net, x_a, a, b, self.params.stopgrad)


@register_method("esd")
class ESD(SelfDistillation):
    __doc__ = f"""Eulerian self-distillation (paper A, Algorithm 3): ∂_a X_{{a,b}} + ∇X_{{a,b}}·v(·; a, a) = 0.

    {PAPER_A}
    """

    Params = ESDParams
    residual_passes = (1, 2)  # the teacher's b̂, the JVP along a, the spatial JVP

    @classmethod
    def backpropagates_jvp(cls, params: ESDParams) -> bool:
        return True  # ∂_a X is the prediction

    def offdiagonal(self, net: CountingNet, x_a: Tensor, a: Tensor, b: Tensor, gen: Gen) -> Term:
        return esd_term(net, x_a, a, b, self.params.stopgrad)


@register_method("psd_mid")
class PSDMid(SelfDistillation):
    __doc__ = f"""Progressive self-distillation through the midpoint, γ = 1/2 (paper A, Algorithm 4).

    {PAPER_A}
    """

    Params = PSDParams
    residual_passes = (3, 0)  # the student and the two teacher jumps

    def offdiagonal(self, net: CountingNet, x_a: Tensor, a: Tensor, b: Tensor, gen: Gen) -> Term:
        return psd_term(net, x_a, a, b, torch.full_like(a, 0.5), self.params.stopgrad)


@register_method("psd_unif")
class PSDUniform(SelfDistillation):
    __doc__ = f"""Progressive self-distillation through a uniform intermediate time, γ ~ U[0, 1] per sample.

    {PAPER_A}
    """

    Params = PSDParams
    residual_passes = (3, 0)

    def offdiagonal(self, net: CountingNet, x_a: Tensor, a: Tensor, b: Tensor, gen: Gen) -> Term:
        gamma = rand(gen, len(a), device=a.device)
        return psd_term(net, x_a, a, b, gamma, self.params.stopgrad)
