"""What a method that distils a frozen teacher's velocity shares: its options and the (guided) teacher velocity b̂."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from pydantic import Field
from torch import Tensor

from orch.methods.contracts.guidance import teacher_velocity
from orch.methods.contracts.method import MethodParams, Setting, TeacherSpec

Velocity = Callable[[Tensor, Tensor], Tensor]
"""b̂(x, t): the velocity field a residual is measured against — the network's own diagonal v(x; t, t) in
self-distillation, a frozen teacher's in distillation. Shapes: x (n, ...), t (n,) → (n, ...)."""


class DistillationParams(MethodParams):
    teacher: TeacherSpec = TeacherSpec()
    """The frozen flow-matching teacher whose velocity b̂ the targets use."""
    init_from_teacher: bool = True
    """Start the student from the teacher's weights, so that v_θ(x; τ, τ) = b̂ at step 0."""
    teacher_guidance: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0
    """ω of the teacher's classifier-free guidance (class-conditional data): b̂ = v_T(∅) + ω·(v_T(y) − v_T(∅)) in
    one batched pass (2 evaluations), so the student distils the guided flow and samples it with one evaluation
    per step. 1: the plain conditional teacher."""


class DistilsTeacher:
    """Mixin of a Method whose targets use the frozen teacher's velocity (Setting.teacher), guided at the
    option teacher_guidance."""

    params: DistillationParams
    setting: Setting

    @classmethod
    def needs_teacher(cls, params: DistillationParams) -> bool:
        return True

    def teacher(self) -> Velocity:
        """b̂(x, t) of the teacher, guided on conditional rows. Keeps the graph of its input x (FMM without
        stop-gradient back-propagates through it); callers that need none wrap it in no_grad."""
        setting, omega = self.setting, self.params.teacher_guidance
        return lambda x, t: teacher_velocity(setting.teacher, setting.num_classes, x, t, omega)

    def teacher_passes(self) -> int:
        """Evaluations of one b̂: 2 when guided (one batched conditional + null pass)."""
        return 2 if self.setting.num_classes is not None and self.params.teacher_guidance != 1.0 else 1
