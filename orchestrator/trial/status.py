"""A trial's status: state.json's `status` and its run's orch.status tag."""

from __future__ import annotations

PENDING, RUNNING, COMPLETED, DIVERGED, FAILED = "pending", "running", "completed", "diverged", "failed"
STOPPED = "stopped"
"""Stopped early by a search scheduler (ASHA): a result, like divergence."""
CANCELLED = "cancelled"
"""Stopped by `orch cancel` or an interruption: not a result; `orch resume` continues it from its checkpoint."""
UNREADABLE = "unreadable"
"""state.json could not be read: the driver re-derives it from the checkpoints and the MLflow run."""
STATUSES = (PENDING, RUNNING, COMPLETED, DIVERGED, FAILED, STOPPED, CANCELLED)
FINISHED_STATES = (COMPLETED, DIVERGED, STOPPED)
"""Trials in these states are results: never run again."""
OUTCOMES = (*FINISHED_STATES, FAILED)
"""What a trial's own run records when it ends: a result, or its own failure (not retried). A trial whose
process ended without one of these died (infrastructure), and its backend retries or records that."""
RUN_STATUS = {FAILED: "FAILED", CANCELLED: "KILLED"}
"""MLflow's run status of an ended trial by its orch status (FINISHED otherwise)."""
