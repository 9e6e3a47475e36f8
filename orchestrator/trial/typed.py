"""A trial's resolved config as one typed object. The study validates and resolves a trial's config to a complete
mapping: its wire form, which trial.json stores, the trial id hashes and MLflow logs. Whatever runs the trial
parses that mapping once into a TrialConfig and passes the object on; nothing below re-validates a section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orch.methods.contracts.registry import Entry
from orch.methods.training.trainer import EvalConfig, TrainConfig
from orch.trial.config import REGISTRY_SECTIONS


@dataclass(frozen=True)
class TrialConfig:
    raw: dict
    """The resolved mapping this object was parsed from (its wire form)."""
    train: TrainConfig
    eval: EvalConfig
    components: dict[str, tuple[Entry, Any]]
    """Each registry section (dataset, model, method, time_sampler): its registry entry and validated options."""

    @classmethod
    def parse(cls, raw: dict) -> TrialConfig:
        """Parse a resolved config (raises pydantic's ValidationError or UnknownName on one that is not)."""
        components = {}
        for section, (registry, _) in REGISTRY_SECTIONS.items():
            entry = registry.get(raw[section]["name"])
            options = {k: v for k, v in raw[section].items() if k != "name"}
            components[section] = (entry, entry.params.model_validate(options))
        return cls(raw, TrainConfig.model_validate(raw["train"]), EvalConfig.model_validate(raw["eval"]), components)

    def with_eval(self, **changes: Any) -> TrialConfig:
        """The same trial evaluated with these eval options changed (as `orch eval` and `orch sample` ask)."""
        return TrialConfig.parse(self.raw | {"eval": self.raw["eval"] | changes})

    def build(self, section: str, *args: Any) -> Any:
        """Build a registry section's component (e.g. "dataset", or "model" with its data shape and scale)."""
        entry, options = self.components[section]
        return entry.build(options, *args)
