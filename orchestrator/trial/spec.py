"""A trial of a study: its id, resolved config and the grid factors it was planned with, with their labels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrialSpec:
    id: str
    config: dict
    factors: dict[str, Any]
    """The grid values of this trial (dotted key → value), e.g. {'method.name': 'lsd', 'train.seed': 0}."""
    levels: dict[str, tuple[int | None, str]] = field(default_factory=dict)
    """Each factor as (index of its level on the axis, label): what the dashboard groups by and orders with."""
    teacher: str | None = None
    """The id of the planned teacher trial this trial distils (None: no teacher, or one the study names)."""
    guide: str | None = None
    """The id of the planned weak teacher trial that autoguides its teacher (None: none, or one the study names)."""
    stage: str | None = None
    """The id of the planned prior stage trial it starts from (None: none, or one the study names)."""

    @property
    def priors(self) -> list[str]:
        """The planned trials it needs trained first: teacher, weak teacher, prior stage."""
        return [p for p in (self.teacher, self.guide, self.stage) if p is not None]

    @property
    def label(self) -> str:
        """e.g. "name=lsd seed=0"; a section-valued axis (method: {name: fm, sampler: heun}) shows its keys."""
        parts = [show_factor(value, key.rsplit(".", 1)[-1]) for key, value in self.factors.items()]
        return " ".join(parts) or self.id


def level_label(value: Any) -> str:
    """A grid level as a group label: a value as written ("lsd", "0.001"), a section by its name and options
    ("meanflow adaptive_p=0.0", nested ones dotted: "sdei teacher.steps=400"); two different levels never share
    a label."""
    if isinstance(value, dict):
        rest = " ".join(f"{k}={v}" for k, v in dotted_items(value) if k != "name")  # values as written
        return f"{value.get('name', '')} {rest}".strip()
    return shown_value(value)


def show_factor(value: Any, key: str | None = None) -> str:
    """A grid value as "key=value", or a section-valued one as its "k=v" pairs ("name=fm sampler=heun")."""
    if isinstance(value, dict):
        return " ".join(f"{k}={shown_value(v)}" for k, v in dotted_items(value))
    return f"{key}={shown_value(value)}" if key else shown_value(value)


def dotted_items(section: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """A section's options as (dotted key, value), nested sections flattened (shown, never a Python dict repr)."""
    items = []
    for key, value in section.items():
        if isinstance(value, dict):
            items += dotted_items(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def shown_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def set_dotted(config: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise KeyError(f"{part!r} is not a mapping")
        node = child
    node[leaf] = value
