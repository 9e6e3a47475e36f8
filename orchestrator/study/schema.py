"""The study file's schema: every key, type and bound of its top level (a trial's sections are validated through
the registries, orchestrator/trial/config.py; the backend section through the backend registry)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from orch.backends.search_space import Search
from orch.methods.contracts.registry import Params

MAX_TRIALS = 10_000
"""Most trials a study may plan: grid combinations (before `exclude`), or grid cells × search samples."""


class Strict(Params):
    """A part of the study file: like every component's options, strict, finite and bounded."""


STUDY_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
"""A study's name: its MLflow experiment and its directory under the work directory (never a path)."""
StudyName = Annotated[str, Field(pattern=f"^{STUDY_NAME}$")]
Axis = Annotated[list[Any], Field(min_length=1)]


class StudyFile(Strict):
    name: StudyName
    description: str = ""
    base: dict[str, Any] = {}
    grid: dict[str, Axis] = {}
    exclude: list[dict[str, Any]] = []
    profiles: dict[str, dict[str, Any]] = {}
    search: Search | None = None
    """Sample trials instead of (or within each cell of) the grid."""
    backend: dict[str, Any] = {}
    """Where trials run: `name` (a registered backend, default ray) and that backend's options."""
    backends: dict[str, dict[str, Any]] = {}
    """The options of other backends, by name, for when the study is switched to one (`--backend NAME`), e.g.
    `slurm: {partition: gpu, gpus_per_node: 1}`; each is checked whichever backend runs the study."""
