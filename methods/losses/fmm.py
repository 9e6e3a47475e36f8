"""Flow map matching distillation (FMM): LSD's and ESD's residuals against a frozen teacher (docs/methods.md §10.1).

Lagrangian map distillation regresses ∂_b X_{a,b}(I_a) onto the teacher's velocity b̂(X_{a,b}(I_a), b), Eulerian map
distillation regresses ∂_a X_{a,b}(I_a) onto −∇_x X_{a,b}(I_a)·b̂(I_a, a): the self-distillation terms with the
velocity b̂ taken from the teacher instead of the model's own diagonal, so `lsd`/`fmm_lmd` and `esd`/`fmm_emd` are
one axis of an ablation. The teacher is known, so no flow-matching diagonal is needed (`diag_fraction` 0); when
asked for, the diagonal regresses v(I_τ; τ, τ) onto b̂(I_τ, τ).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from torch import Tensor

from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.method import Term, register_method
from orch.methods.contracts.teacher import DistillationParams, DistilsTeacher
from orch.methods.losses.self_distillation import ESD, LSD, DiagFraction, LSDParams, esd_term, lsd_term
from orch.methods.runtime.parallel import Gen


class FMMLMDParams(LSDParams, DistillationParams):
    init_from_teacher: bool = False
    """Start the student from the teacher's weights (v_θ(x; τ, τ) = b̂ at step 0); FMM's paper trains from scratch
    (not verified in its text)."""
    diag_fraction: DiagFraction = 0.0
    """Fraction of each batch that regresses the diagonal v(I_τ; τ, τ) onto b̂(I_τ, τ) (FMM needs none: the
    residual's b → a limit already is that regression)."""
    stopgrad: Literal["convex", "none"] = "convex"
    """convex: the teacher's input X_{a,b}(I_a) detached (paper A's choice, the default for images); none: the
    gradient also flows through the teacher's input Jacobian (FMM's paper, no stop-gradient)."""


class FMMEMDParams(FMMLMDParams):
    stopgrad: Literal["full", "none"] = "full"
    """full: the advective term ∇_x X·b̂ detached (as ESD's Algorithm 3); none: the gradient flows through the
    spatial Jacobian too (FMM's paper). The teacher's b̂ never has a gradient."""


FMM = """N. M. Boffi, M. S. Albergo, E. Vanden-Eijnden, "Flow Map Matching", TMLR 2025, arXiv:2406.07507."""


class TeacherResidual(DistilsTeacher):
    """What FMM's two residuals share: the self-distillation residual (`residual`, named `term_name`) against the
    teacher's velocity, the diagonal against the teacher and the teacher's passes in the accounting."""

    term_name: ClassVar[str]
    residual: ClassVar[Callable[..., Term]]

    def offdiagonal(self, net: CountingNet, x_a: Tensor, a: Tensor, b: Tensor, gen: Gen) -> Term:
        term = self.residual(net, x_a, a, b, self.params.stopgrad, self.teacher())
        term.name = self.term_name
        return term

    def diagonal_count(self, batch: int) -> int:
        """⌊η·batch⌋ diagonal rows, possibly none."""
        return int(batch * self.params.diag_fraction)

    def diagonal(self, net: CountingNet, x0: Tensor, x1: Tensor, t: Tensor) -> Term:
        x = self.setting.interpolant.interpolate(x0, x1, t)
        with torch.no_grad():
            target = self.teacher()(x, t)
        return Term("diagonal", net(x, t, t), target, t, t)

    def expected_passes(self, batch: int) -> tuple[float, float]:
        """The student's forward and b̂ on diagonal rows; on the others the residual's passes with the
        teacher's velocity counted as teacher_passes evaluations."""
        diagonal, teacher = self.diagonal_count(batch), self.teacher_passes()
        rest = batch - diagonal
        forward, jvp = self.residual_passes  # one of the forwards is b̂'s
        return (diagonal * (1 + teacher) + (forward - 1 + teacher) * rest) / batch, jvp * rest / batch


@register_method("fmm_lmd")
class FMMLMD(TeacherResidual, LSD):
    __doc__ = f"""Lagrangian map distillation: ∂_b X_{{a,b}}(I_a) = b̂(X_{{a,b}}(I_a), b) for a frozen teacher b̂.

    {FMM}
    """

    Params, term_name, residual = FMMLMDParams, "fmm_lmd", staticmethod(lsd_term)


@register_method("fmm_emd")
class FMMEMD(TeacherResidual, ESD):
    __doc__ = f"""Eulerian map distillation: ∂_a X_{{a,b}}(I_a) + ∇_x X_{{a,b}}(I_a)·b̂(I_a, a) = 0 for a frozen
    teacher b̂.

    {FMM}
    """

    Params, term_name, residual = FMMEMDParams, "fmm_emd", staticmethod(esd_term)
