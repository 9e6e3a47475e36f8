"""Study files: read safely, validate everything in one pass, apply a profile and overrides, expand the grid."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orch.backends.base import BackendParams
from orch.backends.catalog import backend_params, search_refused, workers_refused
from orch.backends.search_space import Search
from orch.problems import Problem, StudyError, did_you_mean, pydantic_problems
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
from orch.study.yaml_source import MAX_BYTES, YAMLLimit, check_limits, key_lines, parse, with_lines
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
        """This version of the study: a hash of what it plans (its backend and description aside)."""
        return digest({k: v for k, v in self.resolved.items() if k not in ("backend", "description")})


def load_study(path: str | Path, profile: str | None = None, overrides: dict[str, Any] | None = None) -> Study:
    """Read, validate and expand a study file. Raises StudyError listing every problem; touches no files."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)  # never more: a huge (or endless) file is refused, not read
        text = data.decode()
    except (OSError, UnicodeDecodeError) as e:
        raise StudyError(source, [Problem("", f"cannot read the file: {e}")]) from None
    return parse_study(text, source, profile, overrides)


def read_raw(text: str, source: str) -> dict:
    """The study file as data: within the limits, plain YAML, no duplicate keys, a mapping. Raises StudyError."""
    try:
        check_limits(text)
        raw = parse(text)
        _, duplicates = key_lines(text)
    except YAMLLimit as e:
        raise StudyError(source, [Problem("", str(e), e.line)]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        message = f"not valid YAML for a study: {getattr(e, 'problem', None) or e}"
        if "constructor" in str(e) or "tag" in str(getattr(e, "problem", "")):
            message = f"unsupported YAML tag: {getattr(e, 'problem', e)} (study files are plain data)"
        raise StudyError(source, [Problem("", message, mark.line + 1 if mark else None)]) from None
    if duplicates:
        raise StudyError(source, [Problem(".".join(k), "duplicate key", line) for k, line in duplicates])
    if not isinstance(raw, dict):
        raise StudyError(source, [Problem("", f"a study is a mapping with name/base/grid…, got {type(raw).__name__}")])
    return raw


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


def parse_study(text: str, source: str, profile: str | None = None, overrides: dict[str, Any] | None = None) -> Study:
    """Validate and expand a study's text, with a profile and command-line overrides (dotted key → value)
    applied. Every problem is reported in one pass, at the line where it is written. Raises StudyError."""
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
    for name, values, from_cli in [
        *([(profile, study["profiles"][profile], False)] if profile in study["profiles"] else []),
        *([(COMMAND_LINE, overrides, True)] if overrides else []),
    ]:
        where = COMMAND_LINE if from_cli else f"profiles.{name}"
        try:
            study = apply_overrides(study, values, axes_from_lists=from_cli)
            origins |= dict.fromkeys(values, where)
        except KeyError as e:
            problems.append(Problem(where, f"cannot apply: {e.args[0]}"))
    backend, found = backend_params(study["backend"])
    problems += [relocate(p, origins) for p in found]
    if study["search"] is not None and backend is not None:
        problems += [relocate(p, origins) for p in search_refused(backend, "backend.name")]
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
        raise StudyError(source, with_lines([Problem(p.path.lstrip("."), p.message) for p in problems], text))
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
