"""What the figures and the tables share: column names as users know them, and means with their intervals."""

from __future__ import annotations

import numpy as np
from scipy import stats


def shown(column: str) -> str:
    """A column as users know it: factor.method.name → method.name."""
    return column.removeprefix("factor.")


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for a single value)."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) == 1:
        return float(values[0]), 0.0
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(half)
