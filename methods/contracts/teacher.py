"""What a method that distils a frozen teacher's velocity shares: its options and the (guided) teacher velocity b̂."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field, model_validator
from torch import Tensor

from orch.methods.contracts.guidance import teacher_velocity
from orch.methods.contracts.method import MethodParams, Setting, TeacherSpec
from orch.methods.contracts.registry import Params, Steps

Velocity = Callable[[Tensor, Tensor], Tensor]
"""b̂(x, t): the velocity field a residual is measured against — the network's own diagonal v(x; t, t) in
self-distillation, a frozen teacher's in distillation. Shapes: x (n, ...), t (n,) → (n, ...)."""


class AutoguideSpec(Params):
    """Autoguidance: the teacher guided by a weaker version of itself, b̂_G = b̂_weak + λ·(b̂ − b̂_weak), both with
    the row's label (Karras et al., 2024; AYF distils it)."""

    weight: Annotated[float, Field(ge=0.0, le=100.0)] = 2.0
    """λ (1: the plain teacher; above 1 extrapolates away from the weak model). AYF's value is not published in
    what was read."""
    path: str | None = None
    """The weak teacher: a teacher file, a trial directory (as method.teacher.path), e.g. an early checkpoint's
    trial. null: orch plans one — the teacher's own recipe trained for `steps` only — and trains it once per work
    directory with the teacher (`orch plan` lists both)."""
    steps: Steps = 300
    """Training steps of the weak teacher orch plans (a tenth of the default teacher's)."""
    model: dict[str, Any] | None = None
    """Options of the planned weak teacher's network that differ from the teacher's, e.g. {width: 32} for a
    smaller one (Karras et al. guide with a smaller, shorter-trained model); null: the teacher's network."""


class DistillationParams(MethodParams):
    teacher: TeacherSpec = TeacherSpec()
    """The frozen flow-matching teacher whose velocity b̂ the targets use."""
    init_from_teacher: bool = True
    """Start the student from the teacher's weights, so that v_θ(x; τ, τ) = b̂ at step 0."""
    teacher_guidance: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0
    """ω of the teacher's classifier-free guidance (class-conditional data): b̂ = v_T(∅) + ω·(v_T(y) − v_T(∅)) in
    one batched pass (2 evaluations), so the student distils the guided flow and samples it with one evaluation
    per step. 1: the plain conditional teacher."""
    autoguide: AutoguideSpec | None = None
    """Guide the teacher by a weaker teacher instead (autoguidance, one more evaluation per b̂); null: none."""

    @model_validator(mode="after")
    def one_guidance(self):
        if self.autoguide is not None and self.teacher_guidance != 1.0:
            raise ValueError("autoguide and teacher_guidance both guide the teacher: set one of them")
        return self


class DistilsTeacher:
    """Mixin of a Method whose targets use the frozen teacher's velocity (Setting.teacher), guided at the
    option teacher_guidance."""

    params: DistillationParams
    setting: Setting

    @classmethod
    def needs_teacher(cls, params: DistillationParams) -> bool:
        return True

    def teacher(self) -> Velocity:
        """b̂(x, t) of the teacher, CFG-guided on conditional rows or autoguided by the weak teacher. Keeps the
        graph of its input x (FMM without stop-gradient back-propagates through it); callers that need none wrap
        it in no_grad."""
        setting, omega, autoguide = self.setting, self.params.teacher_guidance, self.params.autoguide

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            strong = teacher_velocity(setting.teacher, setting.num_classes, x, t, omega)
            if autoguide is None:
                return strong
            weak = setting.guide(x, t, t)
            return weak + autoguide.weight * (strong - weak)

        return velocity

    def teacher_passes(self) -> int:
        """Evaluations of one b̂: 2 when CFG-guided (one batched conditional + null pass) or autoguided (the
        teacher and the weak teacher)."""
        guided = self.setting.num_classes is not None and self.params.teacher_guidance != 1.0
        return 2 if guided or self.params.autoguide is not None else 1
