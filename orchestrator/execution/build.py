"""Building a trial's components from its resolved config through the registries (no tracking, no backend:
importable wherever torch and pydantic are, e.g. on a bare GPU machine for benchmarks)."""

from __future__ import annotations

from pathlib import Path

import torch

from orch.methods.catalog import METHODS
from orch.methods.contracts.guidance import ClassConditioning, num_classes_of
from orch.methods.contracts.interpolants import LinearInterpolant
from orch.methods.contracts.method import Setting
from orch.methods.data.images import DatasetFilesError
from orch.methods.training.trainer import Trainer
from orch.problems import Problem
from orch.trial.config import REGISTRY_SECTIONS
from orch.trial.typed import TrialConfig


def build_section(section_config: dict, section: str, *args):
    """Build one component from a mapping that holds its section alone (e.g. {"dataset": {"name": "mnist"}}),
    as commands and benchmarks that need no whole trial do; a trial builds through its TrialConfig."""
    registry, _ = REGISTRY_SECTIONS[section]
    entry = registry.get(section_config[section]["name"])
    params = entry.params.model_validate({k: v for k, v in section_config[section].items() if k != "name"})
    return entry.build(params, *args)


def conditioning(config: TrialConfig, num_classes: int | None) -> ClassConditioning | None:
    """What the trial's network is conditioned on: its dataset's classes (+ the guidance scale under online CFG, and
    the guidance interval when the method draws it too)."""
    if num_classes is None:
        return None
    method = config.raw["method"]
    return ClassConditioning(
        num_classes, omega=method.get("online_cfg") is not None, interval=method.get("online_interval", False)
    )


def build_network(config: TrialConfig, dataset=None) -> torch.nn.Module:
    """The trial's network for its dataset (built when not given), initialised from train.seed (a
    class-conditional one for conditional data; an unconditional network is built exactly as before
    conditioning existed)."""
    dataset = dataset if dataset is not None else config.build("dataset")
    torch.manual_seed(config.train.seed)
    condition = conditioning(config, num_classes_of(dataset))
    if condition is None:
        return config.build("model", dataset.shape, dataset.std)
    return config.build("model", dataset.shape, dataset.std, condition)


def method_of(method_config: dict):
    """The method class and its parsed options of a (resolved) method section."""
    entry = METHODS.get(method_config["name"])
    return entry.build, entry.params.model_validate({k: v for k, v in method_config.items() if k != "name"})


def needs_teacher(method_config: dict) -> bool:
    """Whether the method of this (resolved) method section distils a teacher, with these options."""
    method, params = method_of(method_config)
    return method.needs_teacher(params)


def prior_stage(method_config: dict) -> tuple[str, dict, dict] | None:
    """(option key, its StageSpec as a mapping, the stage's method section) when the method of this (resolved)
    method section starts from a prior stage (Method.stage_key), else None."""
    method, params = method_of(method_config)
    spec = getattr(params, method.stage_key) if method.stage_key is not None else None
    return None if spec is None else (method.stage_key, spec.model_dump(), method.stage_method(params))


GUIDANCE_EMBEDDERS = ("classes.omega.", "classes.interval.", "cfg_embedder.", "interval_embedders.")
"""Parameter names of the networks' online-CFG embedders of ω and the interval (MLP and UNet; DiT): a teacher has
none."""


def read_weights(path: str | Path) -> dict:
    """A checkpoint's tensors (weights_only: a file's pickled code never runs). Raises ValueError naming it."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a state dict (got {type(saved).__name__})")
    return saved


def build_trainer(
    config: TrialConfig,
    device: torch.device,
    teacher: torch.nn.Module | None = None,
    guide: torch.nn.Module | None = None,
    stage: torch.nn.Module | None = None,
) -> Trainer:
    """Dataset, network, time sampler and method from their registries. A distillation method gets the teacher
    (and autoguidance's weak teacher), and its student starts from the teacher's weights when the method says so;
    a trial with a prior stage starts from the stage's weights and keeps the stage frozen for its method."""
    dataset = config.build("dataset")
    net = build_network(config, dataset)
    if (path := config.raw["model"].get("init_from")) is not None:  # a network with this option can load it
        net.load_pretrained(read_weights(path), path)
    if stage is not None:
        start_from(net, stage, "the prior stage")
    elif teacher is not None and config.raw["method"].get("init_from_teacher"):
        start_from(net, teacher, "method.init_from_teacher: the teacher")
    interpolant = LinearInterpolant(dataset.std)
    sigma_data = float(dataset.std.float().mean())
    time_sampler = config.build("time_sampler", sigma_data)
    num_classes, steps = num_classes_of(dataset), config.train.steps
    setting = Setting(
        interpolant, time_sampler, sigma_data, teacher, num_classes=num_classes, steps=steps, guide=guide, stage=stage
    )
    return Trainer(net, lambda s: config.build("method", s), setting, dataset, config.train, device)


def start_from(net: torch.nn.Module, source: torch.nn.Module, what: str) -> None:
    """Load `source`'s weights into `net`: strict, except that a student with online CFG keeps its own guidance
    embedders (a teacher has none). Raises ValueError naming what differs."""
    missing, unexpected = net.load_state_dict(source.state_dict(), strict=False)
    missing = [k for k in missing if not k.startswith(GUIDANCE_EMBEDDERS)]
    if missing or unexpected:
        raise ValueError(
            f"{what}'s network differs from model: missing {missing or 'none'}, unexpected {unexpected or 'none'}"
        )


def check_data(configs: list[dict]) -> list[Problem]:
    """Load every distinct dataset of these trial configs and check the other files they read (file_problems):
    missing or malformed files are problems naming the path and the expected format (run before anything is
    started or logged)."""
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
    for config in configs:
        problems += [p for p in file_problems(config) if p not in problems]
    return problems + inception_problems({m for config in configs for m in config["eval"]["metrics"]})


def file_problems(config: dict) -> list[Problem]:
    """The files a trial reads besides its data and its teachers (execution/teachers.py), when missing or
    unreadable: a checkpoint to start from, FID reference statistics. Checked on the machine that submits, not at
    validation: a study for a cluster validates and plans anywhere."""
    from orch.methods.evaluation.fid import read_statistics

    problems = []
    if (init := config["model"].get("init_from")) is not None and not Path(init).is_file():
        problems.append(Problem("model.init_from", f"no such file: {init}"))
    if (statistics := config["eval"].get("fid_statistics")) is not None:
        if not Path(statistics).is_file():
            problems.append(Problem("eval.fid_statistics", f"no such file: {statistics}"))
        else:
            try:
                read_statistics(statistics)
            except ValueError as e:
                problems.append(Problem("eval.fid_statistics", str(e)))
    return problems


def inception_problems(metrics: set[str], where: str = "eval.metrics") -> list[Problem]:
    """The Inception weights that these metrics need, when missing (the Inception Score also needs the
    classifier layer, which the offline weights lack)."""
    from orch.methods.evaluation.fid import FIDUnavailable, inception_weights, require_logits
    from orch.methods.evaluation.metric import METRICS

    if not any(m in METRICS and METRICS.get(m).build.extractor for m in metrics):
        return []
    try:
        inception_weights()
        if "is" in metrics:
            require_logits()
    except FIDUnavailable as e:
        return [Problem(where, str(e))]
    return []
