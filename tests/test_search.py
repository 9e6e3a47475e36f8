"""Search through Ray Tune's OptunaSearch: validation, a real search with early stopping, and a search killed
with SIGKILL mid-way and resumed, which must neither lose nor repeat a finished sample."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orch.cli import main
from orch.execution.processes import is_running
from orch.problems import StudyError
from orch.study.load import parse_study
from tests.conftest import STUDIES, recorded_processes

pytestmark = pytest.mark.slow  # starts services or trains beyond a few steps (docs/development.md)

ROOT = Path(__file__).resolve().parent.parent


def test_search_validation_reports_every_problem_with_its_key():
    text = """name: s
base: {train: {steps: 100}}
grid: {train.lr: [1.0e-3]}
search:
  num_samples: 2
  metric: eval/kl/nfe_3
  space:
    train.lr: {uniform: [1.0e-4, 1.0e-2]}
    method.diag_fraction: {uniform: [0.5, 1.5]}
    train.bogus: {choice: [1, 2]}
  scheduler: {grace_period: 100}
"""
    with pytest.raises(StudyError) as info:
        parse_study(text, "s.yaml")
    report = info.value.report()
    assert "search.space.train.lr (line 8): is also a grid axis" in report
    assert "search.space.method.diag_fraction (line 9): 1.5: Input should be less than or equal to 1" in report
    assert "search.space.train.bogus (line 10): 1: unknown key 'bogus'" in report
    assert "search.metric (line 6): 'eval/kl/nfe_3' is not logged" in report
    assert "search.scheduler.grace_period (line 11): must be below train.steps" in report
    with pytest.raises(StudyError) as info:
        parse_study("name: s\nsearch: {num_samples: 1, metric: eval/kl/nfe_1, space: {train.lr: {}}}\n", "s.yaml")
    assert "search.space.train.lr" in info.value.report() and "give exactly one of" in info.value.report()


def trial_states(study_dir: Path) -> dict[str, dict]:
    folder = study_dir / "trials"
    if not folder.exists():
        return {}
    return {d.name: json.loads((d / "state.json").read_text()) for d in folder.iterdir() if (d / "state.json").exists()}


def check_finished_search(study_dir: Path, name: str, samples: int = 4) -> dict:
    """Every one of `samples` finished once, in its own run, inside the space; the parent names the best.
    Returns the runs."""
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    trials = {r.data.tags["orch.trial_id"]: r for r in runs if r.data.tags.get("orch.role") == "trial"}
    states = trial_states(study_dir)
    assert len(states) == samples and set(trials) == set(states)  # one MLflow run per sample, none duplicated
    assert {s["status"] for s in states.values()} <= {"completed", "stopped"}
    configs = {
        (float(r.data.params["train.lr"]), float(r.data.params["method.diag_fraction"])) for r in trials.values()
    }
    assert len(configs) == samples and all(1e-3 <= lr <= 1e-2 and 0.5 <= eta <= 0.9 for lr, eta in configs)
    for trial_id, state in states.items():
        run = trials[trial_id]
        assert run.data.tags["orch.status"] == state["status"] and run.info.status == "FINISHED"
        if state["status"] == "stopped":
            assert state["step"] < 150 and "stopped early" in run.data.tags["orch.reason"]
    parent = next(r for r in runs if r.data.tags.get("orch.role") == "study")
    best = json.loads(parent.data.tags["orch.best"])
    values = {t: s["result"]["eval/kl/nfe_1"] for t, s in states.items()}
    assert best["trial_id"] == min(values, key=values.get) and best["value"] == pytest.approx(min(values.values()))
    assert parent.data.metrics["best/eval/kl/nfe_1"] == pytest.approx(best["value"])
    return trials


def test_search_samples_inside_the_space_stops_poor_samples_and_names_the_best(tmp_path, capsys):
    assert main(["submit", str(STUDIES / "search_tiny.yaml"), "--workdir", str(tmp_path)]) == 0
    assert "best: " in capsys.readouterr().out
    check_finished_search(tmp_path / "search_tiny", "search_tiny")
    statuses = [s["status"] for s in trial_states(tmp_path / "search_tiny").values()]
    assert "stopped" in statuses  # ASHA (grace 30 steps, halving) stopped at least one sample: deterministic here
    page = (tmp_path / "search_tiny" / "dashboard.html").read_text()
    assert "Search progress" in page and "parcoords" in page


def test_killed_search_resumes_without_losing_or_repeating_samples(tmp_path):
    command = [
        sys.executable,
        "-m",
        "orch.cli",
        "submit",
        str(STUDIES / "search_tiny.yaml"),
        "--workdir",
        str(tmp_path),
    ]
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    study_dir = tmp_path / "search_tiny"
    deadline = time.time() + 240
    while time.time() < deadline:
        states = trial_states(study_dir)
        finished = [t for t, s in states.items() if s["status"] in ("completed", "stopped")]
        if finished and len(states) > len(finished):
            break
        assert driver.poll() is None, "the search ended before it could be interrupted"
        time.sleep(0.1)
    started = recorded_processes(study_dir)  # Ray's servers and the workers that took a trial
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = trial_states(study_dir)
    finished_before = {t: s for t, s in before.items() if s["status"] in ("completed", "stopped")}
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    history_before = {t: len(client.get_metric_history(s["run_id"], "train/loss")) for t, s in finished_before.items()}

    assert main(["submit", str(STUDIES / "search_tiny.yaml"), "--workdir", str(tmp_path)]) == 0
    assert not [r for r in started if is_running(r)], "processes of the killed driver were left running"
    trials = check_finished_search(study_dir, "search_tiny")
    after = trial_states(study_dir)
    for trial_id, state in finished_before.items():  # finished samples untouched: not re-run, not re-logged
        assert after[trial_id] == state
        assert len(client.get_metric_history(trials[trial_id].info.run_id, "train/loss")) == history_before[trial_id]
    assert not (study_dir / "driver.json").exists()
    assert os.path.exists(study_dir / "dashboard.html")


def test_search_within_each_grid_cell(tmp_path):
    study = tmp_path / "cells.yaml"
    study.write_text(
        """name: cells
base:
  model: {name: mlp, width: 16, depth: 2}
  train: {steps: 20, batch_size: 128, ema: [0.9], checkpoint_every: 10, log_every: 10, device: cpu}
  eval: {every: 10, nfe: [1], num_samples: 1000}
grid: {method.name: [lsd, psd_mid]}
search:
  algorithm: random
  num_samples: 2
  metric: eval/kl/nfe_1
  space: {train.lr: {loguniform: [1.0e-4, 1.0e-2]}}
backend: {name: ray, max_concurrent: 1}
"""
    )
    assert main(["submit", str(study), "--workdir", str(tmp_path)]) == 0
    trials = [json.loads((d / "trial.json").read_text()) for d in (tmp_path / "cells" / "trials").iterdir()]
    by_method = {}
    for trial in trials:
        by_method.setdefault(trial["config"]["method"]["name"], set()).add(trial["config"]["train"]["lr"])
    assert {m: len(lrs) for m, lrs in by_method.items()} == {"lsd": 2, "psd_mid": 2}
    assert sorted(p.name for p in (tmp_path / "cells" / "ray").iterdir()) == ["search-cell0", "search-cell1"]
    from tests.test_results import groups_of

    groups = groups_of(f"sqlite:///{tmp_path / 'cells' / 'mlflow.db'}", "cells")  # samples, never seeds of one
    assert len(groups) == 4 and all(len(ids) == 1 for ids in groups.values()), groups
