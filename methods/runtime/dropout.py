"""Matching dropout masks between two passes of a network over the same rows."""

from __future__ import annotations

from collections.abc import Callable

import torch


def dropout_rewind(device: torch.device) -> Callable[[], None]:
    """A function that rewinds the RNG that dropout draws from to this point, so that a later pass draws the
    same masks as an earlier one (paper B's estimator and student passes, TiM's difference quotient, ECT's
    target pass)."""
    if device.type == "cuda":
        state = torch.cuda.get_rng_state(device)
        return lambda: torch.cuda.set_rng_state(state, device)
    state = torch.get_rng_state()
    return lambda: torch.set_rng_state(state)
