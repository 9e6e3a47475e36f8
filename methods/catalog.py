"""The complete registries: importing this module registers every dataset, model, method, sampler and metric,
built in or installed.

Installed components come from packages that declare an entry point in the group `orch.plugins` (as submitit
finds executor plugins): each entry point names a module, and importing it registers its components with the
same decorators the built-in ones use. Which plugins load is decided by what is installed, never by a study
file: a study still only names registered components.
"""

import logging
from importlib.metadata import entry_points

from methods import (  # noqa: F401 — importing registers
    consistency,
    dit,
    flow_matching,
    images,
    latents,
    meanflow,
    secant,
    self_distillation,
    shortcut,
    unet,
)
from methods.datasets import DATASETS
from methods.metrics import METRICS
from methods.nets import MODELS
from methods.terms import METHODS
from methods.time_samplers import TIME_SAMPLERS

__all__ = ["DATASETS", "METHODS", "METRICS", "MODELS", "PLUGIN_GROUP", "TIME_SAMPLERS", "load_plugins"]

PLUGIN_GROUP = "orch.plugins"
LOADED: dict[str, str] = {}
"""Entry-point name → its module, for the plugins loaded in this process."""


def load_plugins() -> dict[str, str]:
    """Import every installed plugin once. A plugin that fails to import is skipped with a warning naming it (a
    study using its components then fails validation with "unknown …"), so a broken package never stops orch."""
    for point in entry_points(group=PLUGIN_GROUP):
        if point.name in LOADED:
            continue
        try:
            point.load()
        except Exception as e:  # any error of foreign code: reported, and orch goes on without it
            logging.getLogger(__name__).warning(
                "plugin %r (%s) was not loaded: %s: %s", point.name, point.value, type(e).__name__, e
            )
            continue
        LOADED[point.name] = point.value
    return LOADED


load_plugins()
