"""A trainer for a trial config given by its sections, built as a trial builds it (teacher included)."""

import torch

from orch.execution.build import build_network, build_trainer, needs_teacher
from orch.execution.teachers import planned_guide, planned_stage, teacher_config
from orch.methods.training.trainer import Trainer
from orch.trial.config import resolve_trial_config
from orch.trial.typed import TrialConfig


def frozen_priors(config: dict) -> dict[str, torch.nn.Module | None]:
    """build_trainer's teacher, guide and stage for the resolved trial `config`: a freshly initialised network of
    the teacher's (or the stage's) kind for each one its method needs (any frozen network will do)."""
    method = config["method"]
    teacher = build_network(TrialConfig.parse(teacher_config(config))) if needs_teacher(method) else None
    guide = build_network(TrialConfig.parse(guide)) if (guide := planned_guide(config)) else None
    stage = build_network(TrialConfig.parse(stage)) if (stage := planned_stage(config)) else None
    return {"teacher": teacher, "guide": guide, "stage": stage}


def trainer_for(sections: dict, train: dict | None = None) -> Trainer:
    """The CPU trainer of the trial config `sections` (with `train` options added), with frozen_priors."""
    config, problems = resolve_trial_config(sections | {"train": {"device": "cpu", **(train or {})}})
    assert not problems, problems
    return build_trainer(TrialConfig.parse(config), torch.device("cpu"), **frozen_priors(config))
