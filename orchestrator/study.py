"""Study files: load safely, validate everything at once, apply a profile, expand the grid into trials."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from orchestrator.config import Problem, did_you_mean, pydantic_problems, resolve_trial_config, trial_id
from orchestrator.yaml_source import key_lines, parse


class StudyError(Exception):
    """A study file that cannot run; carries every problem found."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source, self.problems = source, problems
        super().__init__(f"{source}: {len(problems)} problem(s)")

    def report(self) -> str:
        lines = [f"error: {self.source} is not a valid study ({len(self.problems)} problem(s)):"]
        return "\n".join(lines + [f"  - {p}" for p in self.problems])


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Resources(Strict):
    cpu: PositiveFloat = 1
    gpu: Annotated[float, Field(ge=0)] = 0


class Backend(Strict):
    name: Literal["ray", "local"] = "ray"
    max_concurrent: PositiveInt | None = None
    """Trials at once on Ray; null = as many as the resources allow."""
    resources: Resources = Resources()
    """Ray resources per trial (torch's CPU thread count is train.threads)."""
    address: str | None = None
    """An existing Ray cluster (e.g. "ray://head:10001" or "auto"); null starts an embedded local Ray."""


StudyName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")]
Axis = Annotated[list[Any], Field(min_length=1)]


class StudyFile(Strict):
    name: StudyName
    description: str = ""
    base: dict[str, Any] = {}
    grid: dict[str, Axis] = {}
    exclude: list[dict[str, Any]] = []
    profiles: dict[str, dict[str, Any]] = {}
    backend: Backend = Backend()


@dataclass(frozen=True)
class TrialSpec:
    id: str
    config: dict
    factors: dict[str, Any]
    """The grid values of this trial (dotted key → value), e.g. {'method.name': 'lsd', 'train.seed': 0}."""

    @property
    def label(self) -> str:
        return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.factors.items()) or self.id


@dataclass
class Study:
    name: str
    description: str
    profile: str | None
    resolved: dict
    """The study after applying the profile: what `study.yaml` in the study directory records."""
    backend: Backend
    trials: list[TrialSpec] = field(default_factory=list)

    @property
    def axes(self) -> list[str]:
        return list(self.resolved["grid"])


def set_dotted(config: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise KeyError(f"{part!r} is not a mapping")
        node = child
    node[leaf] = value


def apply_profile(study: dict, profile: dict[str, Any]) -> dict:
    """Profile keys replace grid axes (a scalar becomes a one-value axis), `backend.*` keys set the backend,
    all other keys set the base config."""
    study = copy.deepcopy(study)
    for key, value in profile.items():
        if key in study["grid"]:
            study["grid"][key] = value if isinstance(value, list) else [value]
        elif key.startswith("backend."):
            set_dotted(study["backend"], key.removeprefix("backend."), value)
        else:
            set_dotted(study["base"], key, value)
    return study


def excluded(factors: dict[str, Any], rules: list[dict[str, Any]]) -> bool:
    return any(all(factors.get(k) == v for k, v in rule.items()) for rule in rules)


def expand(study: dict) -> tuple[list[TrialSpec], list[Problem]]:
    """Cartesian product of the grid axes minus the excluded combinations, each resolved and identified."""
    axes = study["grid"]
    trials: dict[str, TrialSpec] = {}
    problems: dict[str, Problem] = {}
    for values in itertools.product(*axes.values()):
        factors = dict(zip(axes, values))
        if excluded(factors, study["exclude"]):
            continue
        config = copy.deepcopy(study["base"])
        for key, value in factors.items():
            try:
                set_dotted(config, key, value)
            except KeyError as e:
                problems.setdefault(key, Problem(f"grid.{key}", f"cannot set this key: {e.args[0]}"))
        resolved, found = resolve_trial_config(config)
        for p in found:
            axis = next((a for a in axes if p.path == a or p.path.startswith(a + ".")), None)
            if axis is None:
                p = Problem(f"base.{p.path}", p.message)
            elif p.path.endswith(".name"):
                p = Problem(f"grid.{p.path}", p.message)
            else:
                p = Problem(f"grid.{p.path}", f"{p.message}; in the combination {factors} — drop it with `exclude`")
            problems.setdefault(f"{p.path}: {p.message.split('; in the combination')[0]}", p)
        if not found:
            spec = TrialSpec(trial_id(resolved), resolved, factors)
            trials.setdefault(spec.id, spec)
    if not trials and not problems:
        problems["empty"] = Problem("grid", "no trials: every combination is excluded")
    return list(trials.values()), list(problems.values())


def check_excludes(study: dict) -> list[Problem]:
    problems = []
    for i, rule in enumerate(study["exclude"]):
        for key, value in rule.items():
            if key not in study["grid"]:
                hint = did_you_mean(key, list(study["grid"]))
                problems.append(Problem(f"exclude.{i}.{key}", f"not a grid axis{hint}"))
            elif value not in study["grid"][key]:
                problems.append(Problem(f"exclude.{i}.{key}", f"{value!r} is not a value of this axis"))
    return problems


def with_lines(problems: list[Problem], text: str) -> list[Problem]:
    """Attach the study file's line to each problem, from the longest key path that exists in the file."""
    lines, _ = key_lines(text)
    located = []
    for p in problems:
        parts = tuple(p.path.split(".")) if p.path else ()
        # grid and exclude keys are dotted names themselves: try the two-level split too
        candidates = [(parts[0], ".".join(parts[1:n])) for n in range(len(parts), 2, -1)]
        candidates += [parts[:n] for n in range(len(parts), 0, -1)]
        line = next((lines[c] for c in candidates if c in lines), None)
        located.append(Problem(p.path, p.message, line))
    return located


def load_study(path: str | Path, profile: str | None = None) -> Study:
    """Read, validate and expand a study file. Raises StudyError listing every problem; touches no files."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise StudyError(source, [Problem("", f"cannot read the file: {e}")]) from None
    return parse_study(text, source, profile)


def parse_study(text: str, source: str, profile: str | None = None) -> Study:
    try:
        raw = parse(text)
        _, duplicates = key_lines(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        message = f"not valid YAML for a study: {getattr(e, 'problem', None) or e}"
        if "constructor" in str(e) or "tag" in str(getattr(e, "problem", "")):
            message = f"unsupported YAML tag: {getattr(e, 'problem', e)} (study files are plain data)"
        raise StudyError(source, [Problem("", message, mark.line + 1 if mark else None)]) from None
    if duplicates:
        problems = [Problem(".".join(k), "duplicate key", line) for k, line in duplicates]
        raise StudyError(source, problems)
    if not isinstance(raw, dict):
        raise StudyError(source, [Problem("", f"a study is a mapping with name/base/grid…, got {type(raw).__name__}")])
    try:
        study_file = StudyFile.model_validate(raw)
    except ValidationError as e:
        problems = pydantic_problems(e, "", StudyFile, "study")
        if isinstance(raw.get("base"), dict):  # report the base config's problems in the same pass
            problems += [Problem(f"base.{p.path}", p.message) for p in resolve_trial_config(raw["base"])[1]]
        raise StudyError(source, with_lines(problems, text)) from None
    study = study_file.model_dump()
    problems = []
    if profile is not None:
        if profile not in study["profiles"]:
            known = list(study["profiles"])
            problems.append(
                Problem(
                    "profiles",
                    f"no profile {profile!r}{did_you_mean(profile, known)}; known: {', '.join(known) or 'none'}",
                )
            )
        else:
            try:
                study = apply_profile(study, study["profiles"][profile])
                Backend.model_validate(study["backend"])
            except KeyError as e:
                problems.append(Problem(f"profiles.{profile}", f"cannot apply: {e.args[0]}"))
            except ValidationError as e:
                problems += pydantic_problems(e, f"profiles.{profile}.backend", Backend, "backend")
    problems += check_excludes(study)
    trials, found = expand(study) if not problems else ([], [])
    problems += found
    if problems:
        raise StudyError(source, with_lines([Problem(p.path.lstrip("."), p.message) for p in problems], text))
    del study["profiles"]
    return Study(
        name=study["name"],
        description=study["description"],
        profile=profile,
        resolved=study,
        backend=Backend.model_validate(study["backend"]),
        trials=trials,
    )
