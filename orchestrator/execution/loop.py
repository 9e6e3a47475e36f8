"""The training loop, one for every rank of a trial: train steps, and at the log, evaluation and checkpoint ticks
what rank 0 records. The other ranks of a data-parallel trial run the same loop with nothing to record."""

from __future__ import annotations

from typing import Protocol

import torch

from orch.execution.distributed import lead_says_stop
from orch.methods.training.trainer import EvalConfig, TrainConfig, Trainer


class Lead(Protocol):
    """Rank 0's records at the ticks of the loop (runner.Recorder)."""

    def logged(self, step: int, stats: dict[str, float]) -> None: ...

    def evaluated(self, step: int, scores: dict[str, float], previews: dict[str, torch.Tensor]) -> None: ...

    def checkpointed(self, step: int) -> None: ...


def ticks(step: int, last: bool, train: TrainConfig, evaluation: EvalConfig) -> tuple[bool, bool, bool]:
    """Whether `step` logs statistics, evaluates, checkpoints (every rank computes the same)."""
    return (
        step % train.log_every == 0 or last,
        step % evaluation.every == 0 or last,
        step % train.checkpoint_every == 0 or last,
    )


def training_loop(trainer: Trainer, train: TrainConfig, evaluation: EvalConfig, lead: Lead | None) -> None:
    """Train from trainer.step to train.steps, or until rank 0 stops the trial. `lead` records (rank 0); the other
    ranks pass None: they take the same steps and their share of each evaluation's sampling, while rank 0 alone
    scores, logs and checkpoints.

    With more than one rank, rank 0 says at every tick whether the trial goes on: it stops on what only it sees
    (a search scheduler's word at its log tick, a failing metric), raised from `lead` and told to the others
    before it propagates. It says so once more before an evaluation, so that a stop at its log tick skips the
    evaluation's collectives on every rank."""
    together = trainer.world > 1
    while trainer.step < train.steps:
        logs, evaluates, checkpoints = ticks(trainer.step + 1, trainer.step + 1 == train.steps, train, evaluation)
        tick = logs or evaluates or checkpoints
        stats = trainer.train_step(with_stats=logs)
        try:
            if lead is not None and stats:
                lead.logged(trainer.step, stats)
            if evaluates:
                if together and lead_says_stop(False, trainer.device):
                    return
                scores, previews = trainer.evaluate(evaluation)
                if lead is not None:
                    lead.evaluated(trainer.step, scores, previews)
            if lead is not None and checkpoints:
                lead.checkpointed(trainer.step)
        except BaseException:
            if together and tick and lead is not None:
                lead_says_stop(True, trainer.device)
            raise
        if together and tick and lead_says_stop(False, trainer.device):
            return
