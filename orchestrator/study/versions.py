"""One study name, one plan: a submission that plans other trials than the study last submitted under its name
in the same work directory is told what differs, and runs only when the user asks for a new version (the earlier
trials are kept, hidden from the current version's status and results)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orch.problems import StudyError
from orch.study.load import Study, load_study

PLAN_SECTIONS = ("base", "grid", "exclude", "search")
"""What decides a study's trials (where they run and the description do not)."""


def leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted key → value (lists are values)."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    found = {}
    for key, child in value.items():
        found |= leaves(child, f"{prefix}.{key}" if prefix else str(key))
    return found


def differences(before: dict, after: dict) -> list[str]:
    """'KEY: OLD → NEW' for each dotted key of the plan sections whose value differs."""
    old = leaves({k: before.get(k) for k in PLAN_SECTIONS})
    new = leaves({k: after.get(k) for k in PLAN_SECTIONS})
    missing = "(not set)"
    return [f"{k}: {old.get(k, missing)} → {new.get(k, missing)}" for k in sorted(old.keys() | new.keys())
            if old.get(k, missing) != new.get(k, missing)]  # fmt: skip


def changed_plan(study_dir: Path, study: Study) -> str | None:
    """How `study` plans other trials than the version last submitted into `study_dir`; None when it plans the
    same ones (an evaluation-only change, e.g. more step counts, is the same plan), or when nothing readable was
    submitted there."""
    try:
        before = load_study(study_dir / "study.yaml")
    except StudyError:
        return None
    old, new = {t.id for t in before.trials}, {t.id for t in study.trials}
    if old == new:
        return None
    changes = differences(before.resolved, study.resolved)
    shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
    counts = f"{len(new)} trial(s), {len(old & new)} of them among the {len(old)} submitted before"
    return f"{shown or 'other trials'}: {counts}"
