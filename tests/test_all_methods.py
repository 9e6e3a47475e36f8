"""The all-methods study's smoke profile, for real (sqlite MLflow; on the local backend: the methods are the subject,
not where they run, and each Ray trial process would import torch again): every registered method trains,
evaluates and logs every metric docs/contracts.md names. The study lists the built-in methods with their options;
a registered method it does not list is added at its defaults, so a new method is covered without editing it."""

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orch.cli import main
from orch.methods.catalog import METHODS

STUDY = Path(__file__).resolve().parents[1] / "studies" / "all_methods_checkerboard.yaml"
COST = {"sec_per_kimg", "samples_per_sec", "peak_mem_mb", "fwd_per_sample", "jvp_per_sample", "device_hours"}

pytestmark = pytest.mark.slow


def every_method_study(tmp_path: Path) -> tuple[Path, list[dict]]:
    """The shipped study with every registered method it does not list added at its defaults."""
    study = yaml.safe_load(STUDY.read_text())
    levels = study["grid"]["method"]
    listed = {level["name"] for level in levels}
    levels += [{"name": name} for name in METHODS.names() if name not in listed]
    path = tmp_path / STUDY.name
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path, levels


def teacher_students(levels: list[dict]) -> set[str]:
    """The methods of these grid levels that distil a teacher (by each method's own declaration)."""
    students = set()
    for level in levels:
        entry = METHODS.get(level["name"])
        options = {k: v for k, v in level.items() if k != "name"}
        if entry.build.needs_teacher(entry.params.model_validate(options)):
            students.add(level["name"])
    return students


def test_every_method_completes_and_logs_every_metric(tmp_path):
    study, levels = every_method_study(tmp_path)
    # the wiring is the subject: an eighth of the smoke's work, with as many evaluations
    smaller = [
        "model.width=64",
        "train.batch_size=128",
        "train.steps=100",
        "train.checkpoint_every=50",
        "eval.every=50",
    ]
    submit = ["submit", str(study), "--profile", "smoke", "--backend", "local", *smaller]
    assert main([*submit, "--workdir", str(tmp_path / "runs")]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'all_methods_checkerboard' / 'mlflow.db'}")
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
    assert {r.data.params["method.name"] for r in distilled} == teacher_students(levels)
    assert {"sdei", "sdee", "stei", "scd"} <= teacher_students(levels)  # the built-in distillation methods
    assert len({r.data.tags["orch.teacher"] for r in distilled}) == 1  # one teacher for all of them
    from tests.test_results import groups_of

    groups = groups_of(client.tracking_uri, "all_methods_checkerboard")
    assert {"meanflow", "meanflow adaptive_p=0.0"} <= set(groups)  # the two variants, never averaged as seeds
    assert len(groups) == len(levels) and all(len(ids) == 1 for ids in groups.values())
