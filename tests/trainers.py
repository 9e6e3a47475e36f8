"""A trainer for a trial config given by its sections, built as a trial builds it (teacher included)."""

import torch

from orch.execution.build import build_network, build_trainer, needs_teacher
from orch.methods.training.trainer import Trainer
from orch.trial.config import resolve_trial_config
from orch.trial.typed import TrialConfig


def trainer_for(sections: dict, train: dict | None = None) -> Trainer:
    """The CPU trainer of the trial config `sections` (with `train` options added); a method that distils a
    teacher gets a freshly initialised network of the same kind (any frozen network will do)."""
    config, problems = resolve_trial_config(sections | {"train": {"device": "cpu", **(train or {})}})
    assert not problems, problems
    parsed = TrialConfig.parse(config)
    teacher = build_network(parsed) if needs_teacher(config["method"]) else None
    return build_trainer(parsed, torch.device("cpu"), teacher)
