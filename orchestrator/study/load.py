"""Study files: read safely, validate everything in one pass, apply a profile and overrides, expand the grid."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orch.backends.base import DEFAULT_BACKEND, BackendParams
from orch.backends.catalog import backend_params, search_refused, workers_refused
from orch.backends.search_space import Search
from orch.problems import Problem, StudyError, did_you_mean, pydantic_problems
from orch.study.backend_choice import choose_backend
from orch.study.clusters import Cluster
from orch.study.expand import (
    COMMAND_LINE,
    apply_overrides,
    check_excludes,
    check_search,
    check_size,
    expand,
    plan_teachers,
    relocate,
)
from orch.study.schema import StudyFile
from orch.study.yaml_source import MAX_BYTES, read_raw, with_lines
from orch.trial.config import digest, resolve_trial_config
from orch.trial.spec import TrialSpec, set_dotted


@dataclass
class Study:
    name: str
    description: str
    profile: str | None
    resolved: dict
    """The study after applying the profile: what `study.yaml` in the study directory records."""
    backend: BackendParams
    trials: list[TrialSpec] = field(default_factory=list)
    """The grid's trials; with a `search`, the grid cells the search samples within."""
    search: Search | None = None
    teachers: list[TrialSpec] = field(default_factory=list)
    """The teacher trials the trials distil (planned, run first), once each."""

    @property
    def axes(self) -> list[str]:
        return list(self.resolved["grid"])

    @property
    def generation(self) -> str:
        """This version of the study: a hash of what it plans (where it runs and its description aside)."""
        return digest({k: v for k, v in self.resolved.items() if k not in ("backend", "backends", "description")})


def load_study(
    path: str | Path,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    backend_name: str | None = None,
    cluster: Cluster | None = None,
) -> Study:
    """Read, validate and expand a study file, switched to `backend_name` and `cluster` when given
    (backend_choice.py). Raises StudyError listing every problem; touches no files."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)  # never more: a huge (or endless) file is refused, not read
        text = data.decode()
    except (OSError, UnicodeDecodeError) as e:
        raise StudyError(source, [Problem("", f"cannot read the file: {e}")]) from None
    return parse_study(text, source, profile, overrides, backend_name, cluster)


def validate_file(raw: dict) -> tuple[dict, list[Problem]]:
    """The study file's top level validated; when parts of it are invalid, the study made of the valid parts
    (so that the rest is still checked in the same pass) and the problems."""
    try:
        return StudyFile.model_validate(raw).model_dump(), []
    except ValidationError as e:
        problems = pydantic_problems(e, "", StudyFile, "study")
        broken = {error["loc"][0] for error in e.errors() if error["loc"]}
    salvage = {k: v for k, v in raw.items() if k in StudyFile.model_fields and k not in broken}
    try:
        return StudyFile.model_validate({"name": "study"} | salvage).model_dump(), problems
    except ValidationError:
        return {}, problems


def parse_study(
    text: str,
    source: str,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    backend_name: str | None = None,
    cluster: Cluster | None = None,
) -> Study:
    """Validate and expand a study's text, with a profile and command-line overrides (dotted key → value)
    applied and its backend chosen. Every problem is reported in one pass, at the line where it is written.
    Raises StudyError."""
    study, problems = validate_file(read_raw(text, source))
    if not study:
        raise StudyError(source, with_lines(problems, text))
    found_excludes = check_excludes(study)  # against the file's own grid: a profile may narrow an axis
    problems += found_excludes
    valid_rules = [
        rule
        for i, rule in enumerate(study["exclude"])
        if not any(p.path.startswith(f"exclude.{i}.") for p in found_excludes)
    ]
    origins: dict[str, str] = {}
    if profile is not None and profile not in study["profiles"]:
        known = list(study["profiles"])
        message = f"no profile {profile!r}{did_you_mean(profile, known)}; known: {', '.join(known) or 'none'}"
        problems.append(Problem("profiles", message))
    overrides = overrides or {}
    on_backend = {key: value for key, value in overrides.items() if key.startswith("backend.")}
    others = {key: value for key, value in overrides.items() if key not in on_backend}
    for name, values, from_cli in [
        *([(profile, study["profiles"][profile], False)] if profile in study["profiles"] else []),
        *([(COMMAND_LINE, others, True)] if others else []),
    ]:
        where = COMMAND_LINE if from_cli else f"profiles.{name}"
        try:
            study = apply_overrides(study, values, axes_from_lists=from_cli)
            origins |= dict.fromkeys(values, where)
        except KeyError as e:
            problems.append(Problem(where, f"cannot apply: {e.args[0]}"))
    choice, found = choose_backend(study, backend_name, on_backend, cluster)
    problems += found + unused_backend_problems(study, origins, choice.section["name"] if choice else None)
    origins |= dict.fromkeys(on_backend, COMMAND_LINE)
    backend = None
    if choice is not None:
        study["backend"] = choice.section
        backend, found = backend_params(study["backend"])
        problems += [choice.locate(p, origins) for p in found]
    if study["search"] is not None and backend is not None:
        refused = search_refused(backend, "--backend" if backend_name else "backend.name")
        problems += [Problem(p.path, p.message, 0) if backend_name else relocate(p, origins) for p in refused]
    too_big = check_size(study)
    problems += too_big
    trials, found = expand(study | {"exclude": valid_rules}) if not too_big else ([], [])
    problems += [relocate(p, origins) for p in found]
    teachers = plan_teachers(trials)
    if backend is not None:
        configs = [t.config for t in [*teachers, *trials]]
        problems += [relocate(p, origins) for p in workers_refused(backend, configs, "base.train")]
    if study["search"] is not None and trials:
        problems += [relocate(p, origins) for p in check_search(Search.model_validate(study["search"]), trials)]
    problems += check_other_profiles(study, profile, problems)
    if problems:
        raise StudyError(source, with_lines([Problem(p.path.lstrip("."), p.message, p.line) for p in problems], text))
    del study["profiles"]
    return Study(
        name=study["name"],
        description=study["description"],
        profile=profile,
        resolved=study,
        backend=backend,
        trials=trials,
        search=Search.model_validate(study["search"]) if study["search"] is not None else None,
        teachers=teachers,
    )


def unused_backend_problems(study: dict, origins: dict[str, str], chosen: str | None) -> list[Problem]:
    """The study's backend sections it does not run with, each checked as its backend's options (a typo in the
    Slurm variant is reported when the study runs on Ray): the file's `backend` when the study is switched to
    another backend, and each `backends.NAME` but the chosen one."""
    problems = []
    if study["backend"].get("name", DEFAULT_BACKEND) != chosen:
        problems += [relocate(p, origins) for p in backend_params(study["backend"])[1]]
    for name, section in study["backends"].items():
        if name != chosen:
            problems += backend_params(section | {"name": name}, f"backends.{name}")[1]
    return problems


def check_other_profiles(study: dict, selected: str | None, found: list[Problem]) -> list[Problem]:
    """The profiles not selected, each checked on the first combination of its grid: a typo in a profile is
    reported whichever profile is run, at the profile's line."""
    problems = []
    for name, values in study["profiles"].items():
        if name == selected:
            continue
        try:
            applied = apply_overrides(study, values)
        except KeyError as e:
            problems.append(Problem(f"profiles.{name}", f"cannot apply: {e.args[0]}"))
            continue
        config = copy.deepcopy(applied["base"])
        for axis, levels in applied["grid"].items():
            try:
                set_dotted(config, axis, levels[0])
            except KeyError:
                continue  # reported for the grid itself
        origins = dict.fromkeys(values, f"profiles.{name}")
        for p in resolve_trial_config(config)[1]:
            located = relocate(Problem(f"base.{p.path}", p.message), origins)
            if located.path.startswith("profiles.") and located not in found and located not in problems:
                problems.append(located)
    return problems
