"""Class conditioning and classifier-free guidance (CFG), shared by every method and sampler.

A conditional network takes v(x; a, b, labels, omega, interval): `labels` are class indices with one extra "null"
class (index = number of classes) that means "no class" (CFG's unconditional branch); `omega` is the normalised
guidance scale a student trained with online CFG (paper B's, iMF's) is conditioned on, and `interval` the guidance
interval [τ_lo, τ_hi] an iMF student with `online_interval` is also conditioned on. Methods keep calling net(x, a, b):
the labels of the current rows travel in a `Condition` that the trainer shares between the student, its EMA
copy and the teacher (like the evaluation counter), so a teacher always sees the labels of the rows it scores.

Times of a guidance interval are orch's canonical τ (0 = noise, 1 = data); guidance applies where the jump's
start time τ lies in [lo, hi], elsewhere the plain conditional velocity is used."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from orch.methods.contracts.interpolants import expand_time
from orch.methods.runtime.parallel import Gen, rand


@dataclass
class Condition:
    """The class labels (n,), normalised guidance scales (n,) and guidance intervals (n, 2) of the rows being
    evaluated; None: none."""

    labels: Tensor | None = None
    omega: Tensor | None = None
    interval: Tensor | None = None

    @contextmanager
    def rows(self, rows: slice | Tensor):
        """Narrow the labels and guidance inputs to `rows` (a slice or a boolean mask) of the batch, for a method
        that splits its batch."""
        narrowed = (None if t is None else t[rows] for t in (self.labels, self.omega, self.interval))
        with self.using(*narrowed):
            yield

    @contextmanager
    def using(self, labels: Tensor | None, omega: Tensor | None, interval: Tensor | None):
        """Evaluate with these labels and guidance inputs instead (e.g. a batched conditional + null pass)."""
        saved = self.labels, self.omega, self.interval
        self.labels, self.omega, self.interval = labels, omega, interval
        try:
            yield
        finally:
            self.labels, self.omega, self.interval = saved


@dataclass(frozen=True)
class ClassConditioning:
    """What a conditional network is built for: `num_classes` real classes (+ the null class) and, for online CFG,
    an embedding of the normalised guidance scale (and of the guidance interval's two ends)."""

    num_classes: int
    omega: bool = False
    interval: bool = False


def drop_labels(labels: Tensor, p: float, num_classes: int, gen: Gen) -> Tensor:
    """Replace each label by the null class with probability p (classifier-free guidance training). Shape (n,)."""
    dropped = rand(gen, len(labels)) < p
    return torch.where(dropped, torch.full_like(labels, num_classes), labels)


def in_interval(t: Tensor, interval: tuple[float, float] | None) -> Tensor:
    """Per sample, whether guidance applies at start time t (n,): always without an interval."""
    if interval is None:
        return torch.ones_like(t, dtype=torch.bool)
    return (t >= interval[0]) & (t <= interval[1])


def cond_and_null(net: nn.Module, condition: Condition, num_classes: int, x: Tensor, a: Tensor, b: Tensor):
    """(v(x; a, b, y), v(x; a, b, ∅)) in one batched pass of 2n rows (counted as 2n evaluations)."""
    labels = condition.labels
    null = torch.full_like(labels, num_classes)
    twice = (None if t is None else torch.cat([t, t]) for t in (condition.omega, condition.interval))
    with condition.using(torch.cat([labels, null]), *twice):
        v = net(torch.cat([x, x]), a.repeat(2), b.repeat(2))
    return v.chunk(2)


def cfg_velocity(
    net: nn.Module,
    condition: Condition,
    num_classes: int,
    x: Tensor,
    a: Tensor,
    b: Tensor,
    omega: Tensor | float,
    interval: tuple[float, float] | None = None,
) -> Tensor:
    """Two-pass classifier-free guidance v(∅) + ω·(v(y) − v(∅)) at the rows' labels, with ω a scalar or per
    sample (n,). Rows whose start time a lies outside the guidance interval get the conditional velocity v(y)
    from one pass (so they cost one evaluation, not two). Shape of x."""
    omega = torch.as_tensor(omega, dtype=x.dtype, device=x.device).expand(x.shape[0])
    inside = in_interval(a, interval)
    if not inside.all():
        v = torch.empty_like(x)
        with condition.rows(~inside):
            v[~inside] = net(x[~inside], a[~inside], b[~inside])
        if inside.any():
            with condition.rows(inside):
                rows = (x[inside], a[inside], b[inside], omega[inside])
                v[inside] = cfg_velocity(net, condition, num_classes, *rows)
        return v
    v_cond, v_null = cond_and_null(net, condition, num_classes, x, a, b)
    return v_null + expand_time(omega, x) * (v_cond - v_null)


def teacher_velocity(
    teacher: nn.Module, num_classes: int | None, x: Tensor, t: Tensor, omega: Tensor | float | None = None
) -> Tensor:
    """A frozen teacher's velocity v_T(x; t, t), through two-pass CFG at ω (a scalar or per sample (n,)) on
    conditional rows; one pass when the rows carry no labels or ω is None or 1. Shape of x."""
    if labels_of(teacher) is None or omega is None or (isinstance(omega, float) and omega == 1.0):
        return teacher(x, t, t)
    return cfg_velocity(teacher, teacher.condition, num_classes, x, t, t, omega)


class GuidedNet(nn.Module):
    """A conditional network seen through two-pass CFG at scale ω: what every sampler evaluates to guide."""

    def __init__(
        self, net: nn.Module, condition: Condition, num_classes: int, omega: float, interval: tuple[float, float] | None
    ):
        super().__init__()
        self.net, self.condition, self.num_classes, self.omega, self.interval = (
            net,
            condition,
            num_classes,
            omega,
            interval,
        )

    def forward(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return cfg_velocity(self.net, self.condition, self.num_classes, x, a, b, self.omega, self.interval)


def normalised_omega(omega: Tensor | float, cfg_range: tuple[float, float]) -> Tensor | float:
    """(ω − ω_lo)/(ω_hi − ω_lo): the student's guidance input under paper B's online CFG (0 at ω_lo, 1 at ω_hi)."""
    lo, hi = cfg_range
    return (omega - lo) / (hi - lo)


def num_classes_of(dataset) -> int | None:
    """A dataset's number of classes when it is class-conditional; None otherwise (and for a dataset that does
    not declare `num_classes`, e.g. one registered before conditioning existed)."""
    return getattr(dataset, "num_classes", None)


def rows_of(net: nn.Module, rows: slice):
    """Narrow the labels the counted `net` (and every network sharing its Condition) sees to `rows` of the batch;
    a no-op for a network without a Condition."""
    condition = getattr(net, "condition", None)
    return condition.rows(rows) if condition is not None else nullcontext()


def labels_of(net: nn.Module) -> Tensor | None:
    """The labels a counted network currently sees; None when unconditional (or not a counted network)."""
    condition = getattr(net, "condition", None)
    return None if condition is None else condition.labels
