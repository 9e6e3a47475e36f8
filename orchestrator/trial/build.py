"""Building a trial's components from its resolved config through the registries (no tracking, no backend:
importable wherever torch and pydantic are, e.g. on a bare GPU machine for benchmarks)."""

from __future__ import annotations

import torch

from methods.catalog import METHODS
from methods.images import DatasetFilesError
from methods.interpolants import LinearInterpolant
from methods.terms import Setting
from methods.training import TrainConfig, Trainer
from orchestrator.study.problems import Problem
from orchestrator.trial.config import REGISTRY_SECTIONS


def build_section(config: dict, section: str, *args):
    """Build a config section's component through its registry."""
    registry, _ = REGISTRY_SECTIONS[section]
    entry = registry.get(config[section]["name"])
    params = entry.params.model_validate({k: v for k, v in config[section].items() if k != "name"})
    return entry.build(params, *args)


def build_network(config: dict) -> torch.nn.Module:
    """The trial's network for its dataset, initialised from train.seed."""
    dataset = build_section(config, "dataset")
    torch.manual_seed(config["train"]["seed"])
    return build_section(config, "model", dataset.shape, dataset.std)


def needs_teacher(method_config: dict) -> bool:
    """Whether the method of this (resolved) method section distils a teacher, with these options."""
    entry = METHODS.get(method_config["name"])
    return entry.build.needs_teacher(
        entry.params.model_validate({k: v for k, v in method_config.items() if k != "name"})
    )


def build_trainer(config: dict, device: torch.device, teacher: torch.nn.Module | None = None) -> Trainer:
    """Dataset, network, time sampler and method from their registries. A distillation method gets the teacher,
    and its student starts from the teacher's weights when the method says so."""
    train = TrainConfig.model_validate(config["train"])
    dataset = build_section(config, "dataset")
    net = build_network(config)
    if teacher is not None and config["method"].get("init_from_teacher"):
        try:
            net.load_state_dict(teacher.state_dict())
        except RuntimeError as e:
            raise ValueError(f"method.init_from_teacher: the teacher's network differs from model: {e}") from None
    interpolant = LinearInterpolant(dataset.std)
    sigma_data = float(dataset.std.float().mean())
    setting = Setting(interpolant, build_section(config, "time_sampler", sigma_data), sigma_data, teacher)
    return Trainer(net, lambda s: build_section(config, "method", s), setting, dataset, train, device)


def check_data(configs: list[dict]) -> list[Problem]:
    """Load every distinct dataset of these trial configs: missing or malformed files are problems naming the
    path and the expected format (run before anything is started or logged)."""
    problems, seen = [], set()
    for config in configs:
        key = repr(sorted(config["dataset"].items()))
        if key in seen:
            continue
        seen.add(key)
        try:
            build_section(config, "dataset")
        except DatasetFilesError as e:
            problems.append(Problem("dataset", str(e)))
    if any("fid" in config["eval"]["metrics"] for config in configs):
        from methods.fid import FIDUnavailable, inception_weights

        try:
            inception_weights()
        except FIDUnavailable as e:
            problems.append(Problem("eval.metrics", f"fid: {e}"))
    return problems
