"""Which backend a study runs on, and with which options. `--backend NAME`, a command-line `backend.name=NAME` or
a cluster profile's backend switches a study to NAME: the file's `backend` section then no longer applies, and
its `backends.NAME` section does. The options, lowest precedence first: the cluster profile (`--cluster`), the
study's `backends.NAME`, its `backend` section when that names NAME (with the profile applied), the command
line's `backend.*` keys."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from orch.backends.base import DEFAULT_BACKEND
from orch.problems import Problem
from orch.study.clusters import Cluster
from orch.study.expand import relocate
from orch.trial.spec import set_dotted


@dataclass
class BackendChoice:
    section: dict
    """The backend section the study runs with (its `name` included)."""
    origins: dict[str, str] = field(default_factory=dict)
    """Top-level option → where it was written: "backends.NAME" or a cluster profile; absent for the file's
    `backend` section, its profile and the command line (which `relocate` tells apart)."""

    def locate(self, problem: Problem, profile_origins: dict[str, str]) -> Problem:
        """A problem with the chosen section pointed at where its option was written."""
        option = problem.path.removeprefix("backend.")
        if (where := self.origins.get(option.split(".", 1)[0])) is None:
            return relocate(problem, profile_origins)
        return Problem(f"{where}.{option}", problem.message)


def merged(under: dict, over: dict) -> dict:
    """`over` merged onto a copy of `under`, mapping by mapping."""
    result = copy.deepcopy(under)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(result.get(key), dict)
        result[key] = merged(result[key], value) if both else copy.deepcopy(value)
    return result


def choose_backend(
    study: dict, requested: str | None, command_line: dict[str, Any], cluster: Cluster | None
) -> tuple[BackendChoice | None, list[Problem]]:
    """The backend section of `study` (its profile applied) switched to `requested` and `cluster` if given, with
    the command line's `backend.*` keys on top; or None and the problem when those name different backends."""
    file_name = study["backend"].get("name", DEFAULT_BACKEND)
    named = {"--backend": requested, "backend.name": command_line.get("backend.name")}
    if cluster is not None:
        named[f"--cluster {cluster.name}"] = cluster.section.get("name", DEFAULT_BACKEND)
    named = {where: name for where, name in named.items() if name is not None}
    if len(set(named.values())) > 1:
        told = ", ".join(f"{where} {name!r}" for where, name in named.items())
        return None, [Problem("backend.name", f"different backends asked for: {told}", line=0)]
    name = next(iter(named.values()), file_name)
    choice = BackendChoice({})
    layers = [
        *([(cluster.section, f"--cluster {cluster.name} ({cluster.path})")] if cluster else []),
        (study["backends"].get(name, {}), f"backends.{name}"),
        (study["backend"] if name == file_name else {}, None),
    ]
    for layer, where in layers:
        choice.section = merged(choice.section, layer)
        for option in layer:
            if where is None:
                choice.origins.pop(option, None)
            else:
                choice.origins[option] = where
    for key, value in command_line.items():
        if key.startswith("backend.") and key != "backend.name":
            set_dotted(choice.section, key.removeprefix("backend."), value)
            choice.origins.pop(key.removeprefix("backend.").split(".", 1)[0], None)
    choice.section["name"] = name
    return choice, []
