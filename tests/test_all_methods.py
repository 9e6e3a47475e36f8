"""The all-methods study's smoke profile, for real (embedded Ray, sqlite MLflow): every method of both papers and
every baseline trains, evaluates and logs every metric docs/contracts.md names."""

from pathlib import Path

from mlflow.tracking import MlflowClient

from methods.catalog import METHODS
from orchestrator.cli import main

STUDY = Path(__file__).resolve().parents[1] / "studies" / "all_methods_checkerboard.yaml"
COST = {"sec_per_kimg", "samples_per_sec", "peak_mem_mb", "fwd_per_sample", "jvp_per_sample", "device_hours"}


def test_every_method_completes_and_logs_every_metric(tmp_path):
    assert main(["submit", str(STUDY), "--profile", "smoke", "--workdir", str(tmp_path)]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'all_methods_checkerboard' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("all_methods_checkerboard")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("orch.role") == "trial"]
    assert {r.data.params["method.name"] for r in runs} == set(METHODS.names())
    for run in runs:
        name, metrics = run.data.params["method.name"], set(run.data.metrics)
        assert run.data.tags["orch.status"] in ("completed", "diverged"), name
        assert {"train/loss", "train/grad_norm", "train/lr", "eval/kl/nfe_1", "eval/kl/nfe_4"} <= metrics, name
        assert {f"cost/{c}" for c in COST} <= metrics, name
        terms = {m.split("/")[2] for m in metrics if m.startswith("train/target_std/")}
        assert terms and {f"train/loss/{t}" for t in terms} <= metrics, name
        for term in terms:
            assert any(m.startswith(f"train/target_std/{term}/bin_") for m in metrics), (name, term)
    distilled = [r for r in runs if "orch.teacher" in r.data.tags]
    assert {r.data.params["method.name"] for r in distilled} == {"sdei", "sdee", "stei", "scd"}
    assert len({r.data.tags["orch.teacher"] for r in distilled}) == 1  # one teacher for all of them
    from tests.test_results import groups_of

    groups = groups_of(client.tracking_uri, "all_methods_checkerboard")
    assert {"meanflow", "meanflow adaptive_p=0.0"} <= set(groups)  # the two variants, never averaged as seeds
    assert len(groups) == 17 and all(len(ids) == 1 for ids in groups.values())
