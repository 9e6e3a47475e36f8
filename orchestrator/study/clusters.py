"""Per-user cluster profiles: backend sections by name, written once (a lab's account, QOS, partition, setup
lines) and chosen with `--cluster NAME`. The file is `$ORCH_CLUSTERS`, else ~/.config/orch/clusters.yaml:

    booster:
      name: slurm
      account: hai_lab
      qos: normal
      partition: booster
      setup: ["module load CUDA/12.4"]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orch.backends.catalog import backend_params
from orch.problems import StudyError, did_you_mean
from orch.study.yaml_source import read_raw

CLUSTERS_VARIABLE = "ORCH_CLUSTERS"


@dataclass(frozen=True)
class Cluster:
    name: str
    path: Path
    section: dict
    """The backend section the profile names, with its `name` (the backend; default ray)."""


def clusters_file() -> Path:
    return Path(os.environ.get(CLUSTERS_VARIABLE) or Path.home() / ".config" / "orch" / "clusters.yaml")


class ClusterError(Exception):
    """A cluster profile that cannot be used: one line naming the file and the problem."""


def load_cluster(name: str) -> Cluster:
    """The cluster profile `name`, checked as its backend's options. Raises ClusterError."""
    path = clusters_file()
    try:
        profiles = read_raw(path.read_text(), str(path))
    except OSError as e:
        where = f"${CLUSTERS_VARIABLE}" if os.environ.get(CLUSTERS_VARIABLE) else "the default place"
        raise ClusterError(
            f"--cluster {name}: cannot read the cluster profiles {path} ({where}): {e.strerror}"
        ) from None
    except StudyError as e:
        raise ClusterError(f"{path}: {'; '.join(map(str, e.problems))}") from None
    if name not in profiles:
        known = ", ".join(map(str, profiles)) or "none"
        raise ClusterError(f"{path}: no cluster {name!r}{did_you_mean(name, list(profiles))}; known: {known}")
    section = profiles[name]
    _, problems = backend_params(section, name)
    if problems:
        raise ClusterError(f"{path}: {'; '.join(map(str, problems))}")
    return Cluster(name, path, section)
