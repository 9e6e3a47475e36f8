"""Every backend, found: importing this module imports each backend file of this folder (modules named with a
leading `_` are one backend's helpers and are left to it), so that the registry is complete, and holds the lookups
that need it. Installed plugins register their backends when a registry is first read (orch.methods.catalog)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

import orch.backends
import orch.methods.catalog  # noqa: F401 — the plugins load with the other registries
from orch.backends.base import BACKENDS, DEFAULT_BACKEND, Backend, BackendParams
from orch.methods.contracts.registry import UnknownName, import_folder
from orch.problems import Problem, pydantic_problems

__all__ = ["BACKENDS", "backend_of", "backend_params", "load_builtins", "search_refused", "workers_refused"]


def load_builtins() -> list[str]:
    """Import every backend module of this folder (not the contract, not this catalogue)."""
    return import_folder(orch.backends, skip=("base", "catalog", "search_space"))


def backend_params(raw: dict[str, Any], where: str = "backend") -> tuple[BackendParams | None, list[Problem]]:
    """A study's backend section validated by its backend's own options, or the problems (paths under `where`)."""
    if not isinstance(raw, dict):
        return None, [Problem(where, f"must be a mapping, got {type(raw).__name__}")]
    name = raw.get("name", DEFAULT_BACKEND)
    try:
        entry = BACKENDS.get(name)
    except UnknownName as e:
        return None, [Problem(f"{where}.name", str(e))]
    try:
        return entry.params.model_validate(raw | {"name": name}), []
    except ValidationError as e:
        return None, pydantic_problems(e, where, entry.params, f"backend {name!r}")


def workers_refused(params: BackendParams, configs: list[dict], where: str) -> list[Problem]:
    """Each trial's worker count must suit the backend, and its batch must split equally into its workers × its
    micro-batches."""
    problems = []
    for config in configs:
        train, workers = config["train"], params.trial_workers(config)
        if (reason := params.workers_refused(workers)) is not None:
            problem = Problem(f"{where}.workers", reason)
        elif train["batch_size"] % (workers * train.get("micro_batches", 1)):
            problem = Problem(
                f"{where}.batch_size",
                f"{train['batch_size']} does not split into {workers} data-parallel worker(s) × "
                f"{train.get('micro_batches', 1)} micro-batch(es) of equal size",
            )
        else:
            continue
        if problem not in problems:
            problems.append(problem)
    return problems


def backend_of(params: BackendParams) -> Backend:
    return BACKENDS.get(params.name).build(params)


def search_refused(params: BackendParams, where: str) -> list[Problem]:
    """A study with a search block needs a backend that hosts searches."""
    if BACKENDS.get(params.name).build.hosts_search:
        return []
    hosts = ", ".join(name for name in BACKENDS.names() if BACKENDS.get(name).build.hosts_search)
    message = f"backend {params.name!r} cannot run a search ({hosts} can): use it, or grid the searched keys"
    return [Problem(where, message)]


load_builtins()
