"""The study file's `search` block: the space to sample, the algorithm and the early-stopping scheduler (a backend
that hosts searches runs it, orchestrator/backends/_search.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from orch.methods.contracts.registry import Params

Bounds = Annotated[list[float], Field(min_length=2, max_length=2)]


class SpaceEntry(Params):
    """One searched key: exactly one of the distributions."""

    loguniform: Bounds | None = None
    """[low, high], log-uniform (low > 0)."""
    uniform: Bounds | None = None
    """[low, high], uniform."""
    randint: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None
    """[low, high): integers from low to high − 1."""
    choice: Annotated[list[Any], Field(min_length=1)] | None = None
    """A list of values, one of them per sample."""

    @model_validator(mode="after")
    def one_distribution(self) -> SpaceEntry:
        given = [k for k in ("loguniform", "uniform", "randint", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of loguniform, uniform, randint, choice (got {given or 'none'})")
        bounds = self.loguniform or self.uniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"low must be below high, got {bounds}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs a positive low bound")
        return self

    def extremes(self) -> list[Any]:
        """Values at the edges of the distribution: every one must make a valid trial."""
        if self.choice is not None:
            return list(self.choice)
        if self.randint is not None:
            return [self.randint[0], self.randint[1] - 1]
        return list(self.loguniform or self.uniform)


class Scheduler(Params):
    name: Literal["asha"] = "asha"
    """ASHA (asynchronous successive halving), Ray Tune's."""
    grace_period: PositiveInt
    """Training steps every trial runs before it can be stopped early."""
    reduction_factor: Annotated[float, Field(gt=1)] = 3.0
    """1/reduction_factor of the trials go on at each rung."""


class Search(Params):
    """The `search` section: sample trials with Optuna, random or grid search through Ray Tune."""

    algorithm: Literal["optuna", "random", "grid"] = "optuna"
    """optuna: TPE through Ray Tune's OptunaSearch; random: independent draws; grid: every combination of
    `choice` values (num_samples then repeats the grid)."""
    num_samples: PositiveInt
    """Trials per grid cell."""
    metric: str
    """An evaluation the trials log, e.g. eval/kl/nfe_1."""
    mode: Literal["min", "max"] = "min"
    """Minimise or maximise the metric."""
    space: Annotated[dict[str, SpaceEntry], Field(min_length=1)]
    """Dotted key → one distribution: {loguniform: [low, high]}, {uniform: [low, high]}, {randint: [low,
    high)} or {choice: [values]}."""
    scheduler: Scheduler | None = None
    """Stop poor samples early; null: every sample trains to the end."""
    seed: NonNegativeInt = 0
    """Seed of the searcher."""
