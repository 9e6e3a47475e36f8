"""Shared fixtures: one real submission of the tiny study (embedded Ray, sqlite MLflow) for the whole session."""

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from orch.cli import main

STUDIES = Path(__file__).resolve().parent / "studies"


def recorded_processes(study_dir: Path) -> list[dict]:
    """The processes a study's live driver has recorded as started by it (host, PID, start time)."""
    return [json.loads(path.read_text()) for path in sorted((study_dir / "processes").glob("*.json"))]


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """(workdir, study_dir, exit code) after `orch submit tests/studies/tiny.yaml` on the embedded Ray."""
    workdir = tmp_path_factory.mktemp("runs")
    code = main(["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(workdir)])
    return workdir, workdir / "tiny", code


if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on the machine's cores: one thread each, in every process a test starts too
    # (orch commands, local trials, Slurm jobs inherit the environment): two workers × all cores oversubscribe
    # the cores, and OpenMP's spinning threads then cost more CPU time than the extra threads win (measured: a
    # CPU-bound `orch fid` next to a busy core took 16 s with two threads, 12 s with one).
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The files with the most slow tests first (each keeps its own order): `--dist loadfile
    --no-loadscope-reorder` hands files to the workers in this order, so the long ones start early and the short
    ones fill in at the end, instead of one long file running alone at the end of the suite."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    order = {path: i for i, path in enumerate(dict.fromkeys(item.path for item in items))}
    items.sort(key=lambda item: (-slow[item.path], order[item.path]))
