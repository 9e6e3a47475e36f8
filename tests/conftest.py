"""Shared fixtures: one real submission of the tiny study (embedded Ray, sqlite MLflow) for the whole session."""

from pathlib import Path

import pytest

from orchestrator.cli import main

STUDIES = Path(__file__).resolve().parent / "studies"


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """(workdir, study_dir, exit code) after `orch submit tests/studies/tiny.yaml` on the embedded Ray."""
    workdir = tmp_path_factory.mktemp("runs")
    code = main(["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(workdir)])
    return workdir, workdir / "tiny", code
