"""Shared fixtures: one real submission of the tiny study (embedded Ray, sqlite MLflow) for the whole session."""

import os
from pathlib import Path

import pytest
import torch

from orch.cli import main

STUDIES = Path(__file__).resolve().parent / "studies"


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """(workdir, study_dir, exit code) after `orch submit tests/studies/tiny.yaml` on the embedded Ray."""
    workdir = tmp_path_factory.mktemp("runs")
    code = main(["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(workdir)])
    return workdir, workdir / "tiny", code


if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on the machine's cores: one torch thread each, not two workers × all cores
    torch.set_num_threads(1)
