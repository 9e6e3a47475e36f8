"""Study files: load safely, validate everything at once, apply a profile, expand the grid into trials."""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from methods.registry import Params
from orchestrator.config import (
    Problem,
    did_you_mean,
    digest,
    pydantic_problems,
    resolve_trial_config,
    takes_a_list,
    trial_id,
)
from orchestrator.preflight import parse_address
from orchestrator.yaml_source import MAX_BYTES, YAMLLimit, check_limits, key_lines, parse

MAX_TRIALS = 10_000
"""Most trials a study may plan: grid combinations (before `exclude`), or grid cells × search samples."""


class StudyError(Exception):
    """A study file that cannot run; carries every problem found."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source, self.problems = source, problems
        super().__init__(f"{source}: {len(problems)} problem(s)")

    def report(self) -> str:
        lines = [f"error: {self.source} is not a valid study ({len(self.problems)} problem(s)):"]
        return "\n".join(lines + [f"  - {p}" for p in self.problems])


class Strict(Params):
    """A part of the study file: like every component's options, strict, finite and bounded."""


class Resources(Strict):
    cpu: PositiveFloat = 1
    gpu: Annotated[float, Field(ge=0)] = 0


class Backend(Strict):
    name: Literal["ray", "local", "slurm"] = "ray"
    max_concurrent: PositiveInt | None = None
    """Trials at once on Ray; null = as many as the resources allow."""
    resources: Resources = Resources()
    """Ray resources per trial (torch's CPU thread count is train.threads)."""
    address: str | None = None
    """An existing Ray cluster (e.g. "ray://head:10001", "head:6379" or "auto"); null starts an embedded local Ray
    on 127.0.0.1."""
    max_failures: NonNegativeInt = 1
    """Retries of a trial after an infrastructure failure (a Ray worker or a Slurm job that died without
    recording an outcome). An exception in the trial itself is a `failed` result and is not retried."""
    # Slurm (submitit's parameter names); a study's trials go out as one job array per submission
    partition: str | None = None
    timeout_min: PositiveInt = 240
    cpus_per_task: PositiveInt = 1
    gpus_per_node: NonNegativeInt = 0
    mem_gb: PositiveFloat | None = None
    array_parallelism: PositiveInt = 64
    """At most this many of the array's jobs run at once."""

    @field_validator("address")
    @classmethod
    def ray_address(cls, address: str | None) -> str | None:
        if address is not None:
            parse_address(address)
        return address


STUDY_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
"""A study's name: its MLflow experiment and its directory under the work directory (never a path)."""
StudyName = Annotated[str, Field(pattern=f"^{STUDY_NAME}$")]
Axis = Annotated[list[Any], Field(min_length=1)]


Bounds = Annotated[list[float], Field(min_length=2, max_length=2)]


class SpaceEntry(Strict):
    """One searched key: exactly one of the distributions."""

    loguniform: Bounds | None = None
    uniform: Bounds | None = None
    randint: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None
    """[low, high): integers from low to high − 1."""
    choice: Annotated[list[Any], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def one_distribution(self) -> SpaceEntry:
        given = [k for k in ("loguniform", "uniform", "randint", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of loguniform, uniform, randint, choice (got {given or 'none'})")
        bounds = self.loguniform or self.uniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"low must be below high, got {bounds}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs a positive low bound")
        return self

    def extremes(self) -> list[Any]:
        """Values at the edges of the distribution: every one must make a valid trial."""
        if self.choice is not None:
            return list(self.choice)
        if self.randint is not None:
            return [self.randint[0], self.randint[1] - 1]
        return list(self.loguniform or self.uniform)


class Scheduler(Strict):
    name: Literal["asha"] = "asha"
    grace_period: PositiveInt
    """Training steps every trial runs before it can be stopped early."""
    reduction_factor: Annotated[float, Field(gt=1)] = 3.0


class Search(Strict):
    algorithm: Literal["optuna", "random", "grid"] = "optuna"
    """optuna: TPE through Ray Tune's OptunaSearch; random: independent draws; grid: every combination of
    `choice` values (num_samples then repeats the grid)."""
    num_samples: PositiveInt
    """Trials per grid cell."""
    metric: str
    mode: Literal["min", "max"] = "min"
    space: Annotated[dict[str, SpaceEntry], Field(min_length=1)]
    scheduler: Scheduler | None = None
    seed: NonNegativeInt = 0


class StudyFile(Strict):
    name: StudyName
    description: str = ""
    base: dict[str, Any] = {}
    grid: dict[str, Axis] = {}
    exclude: list[dict[str, Any]] = []
    profiles: dict[str, dict[str, Any]] = {}
    search: Search | None = None
    """Sample trials instead of (or within each cell of) the grid."""
    backend: Backend = Backend()


@dataclass(frozen=True)
class TrialSpec:
    id: str
    config: dict
    factors: dict[str, Any]
    """The grid values of this trial (dotted key → value), e.g. {'method.name': 'lsd', 'train.seed': 0}."""
    levels: dict[str, tuple[int | None, str]] = field(default_factory=dict)
    """Each factor as (index of its level on the axis, label): what the dashboard groups by and orders with."""

    @property
    def label(self) -> str:
        """e.g. "name=lsd seed=0"; a section-valued axis (method: {name: fm, sampler: heun}) shows its keys."""
        parts = [show_factor(value, key.rsplit(".", 1)[-1]) for key, value in self.factors.items()]
        return " ".join(parts) or self.id


def level_label(value: Any) -> str:
    """A grid level as a group label: a value as written ("lsd", "0.001"), a section by its name and options
    ("meanflow adaptive_p=0.0"); two different levels never share a label."""
    if isinstance(value, dict):
        rest = " ".join(f"{k}={v}" for k, v in value.items() if k != "name")
        return f"{value.get('name', '')} {rest}".strip()
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def show_factor(value: Any, key: str | None = None) -> str:
    """A grid value as "key=value", or a section-valued one as its "k=v" pairs ("name=fm sampler=heun")."""
    items = value.items() if isinstance(value, dict) else [(key, value)]
    shown = ((k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in items)
    return " ".join(f"{k}={v}" if k else str(v) for k, v in shown)


@dataclass
class Study:
    name: str
    description: str
    profile: str | None
    resolved: dict
    """The study after applying the profile: what `study.yaml` in the study directory records."""
    backend: Backend
    trials: list[TrialSpec] = field(default_factory=list)
    """The grid's trials; with a `search`, the grid cells the search samples within."""
    search: Search | None = None

    @property
    def axes(self) -> list[str]:
        return list(self.resolved["grid"])

    @property
    def generation(self) -> str:
        """This version of the study: a hash of what it plans (its backend and description aside)."""
        return digest({k: v for k, v in self.resolved.items() if k not in ("backend", "description")})


def set_dotted(config: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise KeyError(f"{part!r} is not a mapping")
        node = child
    node[leaf] = value


def apply_overrides(study: dict, overrides: dict[str, Any], axes_from_lists: bool = False) -> dict:
    """A study with a profile's (or the command line's) dotted keys applied: a key that is a grid axis replaces the
    axis (a scalar becomes a one-value axis); with `axes_from_lists` (the command line) a list makes or
    replaces an axis, except for an option that is itself a list (eval.nfe=[1,4] sets it; a list of lists
    makes an axis of it); `backend.*` and `search.*` keys set the backend and the search; others set the base."""
    study = copy.deepcopy(study)
    for key, value in overrides.items():
        makes_axis = axes_from_lists and isinstance(value, list) and not takes_a_list(study["base"], key)
        if key in study["grid"] or makes_axis:
            study["grid"][key] = value if isinstance(value, list) else [value]
        elif key.startswith(("backend.", "search.")) and study.get(key.split(".")[0]) is not None:
            section, rest = key.split(".", 1)
            set_dotted(study[section], rest, value)
        else:
            set_dotted(study["base"], key, value)
    return study


def origin_of(path: str, origins: dict[str, str]) -> str | None:
    """Where the value at a problem's path was written: "profiles.<name>" or "command line", None for the file's
    base and grid. `origins` maps each overriding dotted key to where it came from."""
    bare = path.split(".", 1)[1] if path.startswith(("base.", "grid.")) else path
    return next((where for key, where in origins.items() if bare == key or bare.startswith(key + ".")), None)


def relocate(problem: Problem, origins: dict[str, str]) -> Problem:
    """A problem pointed at the profile or command-line override that wrote the value, not at the base."""
    where = origin_of(problem.path, origins)
    if where is None:
        return problem
    bare = problem.path.split(".", 1)[1] if problem.path.startswith(("base.", "grid.")) else problem.path
    if where == COMMAND_LINE:
        return Problem(bare, f"{problem.message} (set on the command line)")
    return Problem(f"{where}.{bare}", problem.message)


COMMAND_LINE = "command line"


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
            elif p.path.endswith(".name") or p.message.startswith("unknown key"):  # a typo, not a combination
                p = Problem(f"grid.{p.path}", p.message)
            else:
                p = Problem(f"grid.{p.path}", f"{p.message}; in the combination {factors} — drop it with `exclude`")
            problems.setdefault(f"{p.path}: {p.message.split('; in the combination')[0]}", p)
        if not found:
            levels = {a: (axes[a].index(v), level_label(v)) for a, v in factors.items()}
            spec = TrialSpec(trial_id(resolved), resolved, factors, levels)
            if (same := trials.setdefault(spec.id, spec)) is not spec and same.config != spec.config:
                differ = [a for a in axes if a.split(".")[0] == "eval" or a in ("train", "eval")]
                problems.setdefault(
                    f"same training {spec.id}",
                    Problem(
                        f"grid.{(differ or list(axes))[0]}",
                        f"{same.factors} and {factors} train the same trial (they differ in evaluation or "
                        "execution settings only): evaluate several step counts with eval.nfe in one trial",
                    ),
                )
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


def check_size(study: dict) -> list[Problem]:
    """The grid is counted before it is expanded: past MAX_TRIALS a study is refused, naming the axes."""
    sizes = {axis: len(values) for axis, values in study["grid"].items()}
    combinations = math.prod(sizes.values())
    samples = study["search"]["num_samples"] if study["search"] is not None else 1
    if combinations * samples <= MAX_TRIALS:
        return []
    axes = " × ".join(f"{axis} {n}" for axis, n in sizes.items() if n > 1)
    if study["search"] is not None:
        message = f"{combinations:,} grid cell(s) × {samples:,} samples = {combinations * samples:,} trials"
    else:
        message = f"the grid has {combinations:,} combinations ({axes})"
    hint = "sample a large space with a `search` block" if study["search"] is None else "sample fewer"
    return [Problem("grid", f"{message}; a study plans at most {MAX_TRIALS:,} trials: {hint}")]


def logged_metrics(config: dict) -> list[str]:
    return [f"eval/{m}/nfe_{n}" for m in config["eval"]["metrics"] for n in config["eval"]["nfe"]]


def check_search(search: Search, cells: list[TrialSpec]) -> list[Problem]:
    """Every edge of every searched distribution must give a valid trial in every grid cell, and the searched
    metric must be one the trials log."""
    problems: dict[str, Problem] = {}
    for cell in cells:
        for key, entry in search.space.items():
            if key in cell.factors:
                problems.setdefault(key, Problem(f"search.space.{key}", "is also a grid axis: search it or grid it"))
                continue
            if search.algorithm == "grid" and entry.choice is None:
                problems.setdefault(key, Problem(f"search.space.{key}", "algorithm grid needs `choice` values"))
            for value in entry.extremes():
                config = copy.deepcopy(cell.config)
                try:
                    set_dotted(config, key, value)
                except KeyError as e:
                    problems.setdefault(key, Problem(f"search.space.{key}", f"cannot set this key: {e.args[0]}"))
                    continue
                for p in resolve_trial_config(config)[1]:
                    problems.setdefault(
                        f"{key}: {p.message}", Problem(f"search.space.{key}", f"{value!r}: {p.message}")
                    )
        if search.metric not in logged_metrics(cell.config):
            known = ", ".join(logged_metrics(cell.config))
            problems.setdefault(
                "metric",
                Problem("search.metric", f"{search.metric!r} is not logged by these trials; choose from {known}"),
            )
        if search.scheduler and search.scheduler.grace_period >= cell.config["train"]["steps"]:
            problems.setdefault("grace", Problem("search.scheduler.grace_period", "must be below train.steps"))
    return list(problems.values())


def with_lines(problems: list[Problem], text: str) -> list[Problem]:
    """Attach the study file's line to each problem, from the longest key path that exists in the file."""
    lines, _ = key_lines(text)
    located = []
    for p in problems:
        parts = tuple(p.path.split(".")) if p.path else ()
        # grid, exclude and search keys are dotted names themselves: try every way of joining the parts
        candidates = [(*parts[:i], ".".join(parts[i:j])) for j in range(len(parts), 0, -1) for i in range(j)]
        line = next((lines[c] for c in candidates if c in lines), None)
        located.append(Problem(p.path, p.message, line))
    return located


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
    try:
        Backend.model_validate(study["backend"])
    except ValidationError as e:
        problems += [relocate(p, origins) for p in pydantic_problems(e, "backend", Backend, "backend")]
    too_big = check_size(study)
    problems += too_big
    trials, found = expand(study | {"exclude": valid_rules}) if not too_big else ([], [])
    problems += [relocate(p, origins) for p in found]
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
        backend=Backend.model_validate(study["backend"]),
        trials=trials,
        search=Search.model_validate(study["search"]) if study["search"] is not None else None,
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
