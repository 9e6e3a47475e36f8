"""The complete registries: importing this module registers every dataset, model, method, sampler and metric,
built in or installed.

Built-in components are found, not listed: every module of the component folders (losses/, networks/, data/,
evaluation/) is imported once, and importing a module registers what it defines. Adding a method, network,
dataset or metric is one new file in its folder.

Installed components come from packages that declare an entry point in the group `orch.plugins` (as submitit
finds executor plugins): each entry point names a module, and importing it registers its components with the
same decorators the built-in ones use. They load when a registry is first read (a plugin imports orch.api, which
needs the whole of orch imported). Which code loads is decided by what is installed, never by a study file: a
study still only names registered components.
"""

import logging
from importlib.metadata import entry_points

from orch.methods import data, evaluation, losses, networks
from orch.methods.contracts.method import METHODS
from orch.methods.contracts.registry import Registry, import_folder
from orch.methods.contracts.time_samplers import TIME_SAMPLERS
from orch.methods.data.base import DATASETS
from orch.methods.evaluation.metric import METRICS
from orch.methods.networks.base import MODELS

__all__ = ["DATASETS", "METHODS", "METRICS", "MODELS", "PLUGIN_GROUP", "TIME_SAMPLERS", "load_plugins"]

COMPONENT_FOLDERS = (losses, networks, data, evaluation)
"""The folders whose every module is imported: each registers its components on import."""

PLUGIN_GROUP = "orch.plugins"
LOADED: dict[str, str] = {}
"""Entry-point name → its module, for the plugins loaded in this process."""


def load_builtins() -> list[str]:
    """Import every module of the component folders."""
    return [name for folder in COMPONENT_FOLDERS for name in import_folder(folder)]


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


load_builtins()
Registry.before_first_read.append(load_plugins)
