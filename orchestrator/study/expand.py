"""A study's grid expanded into trials: profiles and command-line overrides applied, combinations excluded and
counted, each trial resolved and identified, problems pointed at the line that wrote them."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

from orch.backends.search_space import Search
from orch.execution.teachers import TeacherError, planned_guide, planned_stage, planned_teacher
from orch.problems import Problem, did_you_mean
from orch.study.schema import MAX_TRIALS
from orch.tracking.schema import eval_key
from orch.trial.config import EXECUTION_ONLY, resolve_trial_config, takes_a_list, trial_id
from orch.trial.spec import TrialSpec, level_label, set_dotted


def apply_overrides(study: dict, overrides: dict[str, Any], axes_from_lists: bool = False) -> dict:
    """A study with a profile's (or the command line's) dotted keys applied: a key that is a grid axis replaces the
    axis (a scalar becomes a one-value axis); with `axes_from_lists` (the command line) a list makes or
    replaces an axis, except for an option that is itself a list (eval.nfe=[1,4] sets it; a list of lists
    makes an axis of it); `backend.*`, `backends.*` and `search.*` keys set the backend, its variants and the
    search; others set the base."""
    study = copy.deepcopy(study)
    for key, value in overrides.items():
        if axes_from_lists and not isinstance(value, list) and takes_a_list(study["base"], key):
            value = [value]  # eval.nfe=4 on the command line means [4]
        makes_axis = axes_from_lists and isinstance(value, list) and not takes_a_list(study["base"], key)
        if key in study["grid"] or makes_axis:
            study["grid"][key] = value if isinstance(value, list) else [value]
        elif key.startswith(("backend.", "backends.", "search.")) and study.get(key.split(".")[0]) is not None:
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
        return Problem(bare, f"{problem.message} (set on the command line)", line=0)  # at no line of the file
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
                # a copy: a section-valued level (method: {name: …}) must not take a later axis's key (method.x)
                set_dotted(config, key, copy.deepcopy(value))
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
            try:
                priors = priors_of(resolved)
            except TeacherError as e:  # e.g. a stage whose options do not fit the train section
                where = "grid.method" if any(a.split(".")[0] == "method" for a in axes) else "base.method"
                problems.setdefault(str(e), Problem(where, str(e)))
                continue
            levels = {a: (axes[a].index(v), level_label(v)) for a, v in factors.items()}
            spec = TrialSpec(trial_id(resolved), resolved, factors, levels, *priors)
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


def planned_id(config: dict | None) -> str | None:
    return trial_id(config) if config is not None else None


def priors_of(config: dict) -> tuple[str | None, str | None, str | None]:
    """The ids of the planned trials a trial's config needs trained first: its teacher, autoguidance's weak
    teacher, its prior stage (None where there is none, or the study names a file)."""
    return planned_id(planned_teacher(config)), planned_id(planned_guide(config)), planned_id(planned_stage(config))


def plan_teachers(trials: list[TrialSpec]) -> list[TrialSpec]:
    """The teacher trials, autoguidance's weak teachers and prior stages the study's trials need, once each, each
    after the trials it needs itself (a stage distils the teacher): trials of their own, run first."""
    planned: dict[str, TrialSpec] = {}

    def plan(spec: TrialSpec) -> None:
        priors = ((spec.teacher, planned_teacher), (spec.guide, planned_guide), (spec.stage, planned_stage))
        for prior, config_of in priors:
            if prior is not None and prior not in planned:
                config = config_of(spec.config)
                role = "stage" if config_of is planned_stage else "teacher"
                needed = TrialSpec(prior, config, {role: config["method"]["name"]}, {}, *priors_of(config))
                plan(needed)
                planned[prior] = needed

    for spec in trials:
        plan(spec)
    return list(planned.values())


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
    evaluation = config["eval"]
    return [eval_key(m, n, w) for m in evaluation["metrics"] for w in evaluation["guidance"] for n in evaluation["nfe"]]


def changed_priors(config: dict, cell: TrialSpec) -> str | None:
    """Why a sampled config cannot share its grid cell's planned trials (teacher, weak teacher, stage), else None."""
    try:
        if priors_of(config) == (cell.teacher, cell.guide, cell.stage):
            return None
    except TeacherError as e:
        return str(e)
    return "changes what the trial trains first (its teacher or stage): make it a grid axis"


def check_search(search: Search, cells: list[TrialSpec]) -> list[Problem]:
    """Every edge of every searched distribution must give a valid trial in every grid cell, and the searched
    metric must be one the trials log."""
    problems: dict[str, Problem] = {}
    for cell in cells:
        for key, entry in search.space.items():
            if key in cell.factors:
                problems.setdefault(key, Problem(f"search.space.{key}", "is also a grid axis: search it or grid it"))
                continue
            if key.startswith("train.") and key.split(".", 1)[1] in EXECUTION_ONLY:
                message = "says how a trial runs, not what it trains: every sample would be the same trial"
                problems.setdefault(key, Problem(f"search.space.{key}", message))
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
                resolved, found = resolve_trial_config(config)
                for p in found:
                    problems.setdefault(
                        f"{key}: {p.message}", Problem(f"search.space.{key}", f"{value!r}: {p.message}")
                    )
                if not found and (changed := changed_priors(resolved, cell)):
                    problems.setdefault(f"{key}: teacher", Problem(f"search.space.{key}", f"{value!r}: {changed}"))
        if search.metric not in logged_metrics(cell.config):
            known = ", ".join(logged_metrics(cell.config))
            problems.setdefault(
                "metric",
                Problem("search.metric", f"{search.metric!r} is not logged by these trials; choose from {known}"),
            )
        if search.scheduler and search.scheduler.grace_period >= cell.config["train"]["steps"]:
            problems.setdefault("grace", Problem("search.scheduler.grace_period", "must be below train.steps"))
    return list(problems.values())
