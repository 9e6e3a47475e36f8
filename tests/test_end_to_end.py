"""`orch submit` for real: embedded Ray, a real sqlite MLflow store, the dashboard, idempotent re-submission,
and divergence as a result. No mocks."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orch.cli import main
from tests.conftest import STUDIES

pytestmark = pytest.mark.slow  # starts services or trains beyond a few steps (docs/development.md)

EVAL_KEYS = {"eval/kl/nfe_1", "eval/kl/nfe_2"}
COST_KEYS = {
    "cost/sec_per_kimg",
    "cost/samples_per_sec",
    "cost/peak_mem_mb",
    "cost/fwd_per_sample",
    "cost/jvp_per_sample",
    "cost/device_hours",
}


def store(study_dir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")


def runs_of(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], max_results=1000)


def test_ray_submission_completes_and_tracks_every_trial(tiny_study):
    workdir, study_dir, code = tiny_study
    assert code == 0
    runs = runs_of(store(study_dir), "tiny")
    parents = [r for r in runs if r.data.tags.get("orch.role") == "study"]
    children = [r for r in runs if r.data.tags.get("orch.role") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["orch.git_commit"]
    assert json.loads(parent.data.tags["orch.axes"]) == ["method.name", "train.seed"]
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["orch.status"] == "completed" and run.info.status == "FINISHED"
        metrics = set(run.data.metrics)
        assert EVAL_KEYS | COST_KEYS <= metrics
        assert {"train/loss", "train/grad_norm", "train/lr", "train/loss/diag", "train/target_std/diag"} <= metrics
        term = "lsd" if run.data.params["method.name"] == "lsd" else "psd"
        assert {f"train/loss/{term}", f"train/target_std/{term}"} <= metrics
        assert run.data.params["train.steps"] == "60"
        trial_dir = study_dir / "trials" / run.data.tags["orch.trial_id"]
        state = json.loads((trial_dir / "state.json").read_text())
        assert state["status"] == "completed" and state["step"] == 60 and state["run_id"] == run.info.run_id
        assert sorted(p.name for p in (trial_dir / "checkpoints").iterdir()) == [
            "step_000000030.pt",
            "step_000000060.pt",
        ]
        steps = [m.step for m in store(study_dir).get_metric_history(run.info.run_id, "eval/kl/nfe_1")]
        assert steps == [30, 60]


def test_dashboard_is_self_contained_with_figures(tiny_study):
    _, study_dir, _ = tiny_study
    page = (study_dir / "dashboard.html").read_text()
    assert page.count("Plotly.newPlot(") >= 4
    assert '<script src="http' not in page  # plotly.js inlined: opens offline
    assert "lsd" in page and "psd_mid" in page
    artifacts = store(study_dir).list_artifacts(
        next(r for r in runs_of(store(study_dir), "tiny") if r.data.tags.get("orch.role") == "study").info.run_id
    )
    assert {"dashboard.html", "study.yaml"} <= {a.path for a in artifacts}


def test_resubmitting_runs_nothing_again(tiny_study, capsys):
    workdir, study_dir, _ = tiny_study
    client = store(study_dir)
    before = {
        r.info.run_id: len(client.get_metric_history(r.info.run_id, "train/loss")) for r in runs_of(client, "tiny")
    }
    capsys.readouterr()
    assert main(["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(workdir)]) == 0
    assert "4 already finished, 0 to run" in capsys.readouterr().out
    after = {
        r.info.run_id: len(client.get_metric_history(r.info.run_id, "train/loss")) for r in runs_of(client, "tiny")
    }
    assert after == before


def test_status_lists_every_trial(tiny_study, capsys):
    workdir, _, _ = tiny_study
    capsys.readouterr()
    assert main(["status", "tiny", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert out.count("completed") == 5 and "4 completed" in out  # 4 rows + the summary line


def test_divergence_is_a_result_and_the_sweep_goes_on(tmp_path):
    assert main(["submit", str(STUDIES / "diverging.yaml"), "--workdir", str(tmp_path)]) == 0
    runs = [r for r in runs_of(store(tmp_path / "diverging"), "diverging") if r.data.tags.get("orch.role") == "trial"]
    by_lr = {float(r.data.params["train.lr"]): r for r in runs}
    assert by_lr[1e-3].data.tags["orch.status"] == "completed"
    diverged = by_lr[1e12]
    assert diverged.data.tags["orch.status"] == "diverged" and diverged.info.status == "FINISHED"
    assert "non-finite" in diverged.data.tags["orch.reason"]
    assert int(diverged.data.tags["orch.stopped_step"]) < 40
    page = (tmp_path / "diverging" / "dashboard.html").read_text()
    assert "diverged" in page
