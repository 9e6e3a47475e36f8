"""Teachers of distillation methods: trained once per (dataset, network, budget) and reused, also by trials
running at the same time on Ray and by other studies; a named teacher is used as given."""

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orch.cli import main
from orch.execution.teachers import EXPERIMENT, TEACHER_FILE
from tests.conftest import STUDIES

pytestmark = pytest.mark.slow  # starts services or trains beyond a few steps (docs/development.md)


def teacher_runs(study_dir: Path) -> list:
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return [r for r in runs if r.data.tags.get("orch.role") == "trial"]


def trial_runs(study_dir: Path, name: str) -> list:
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=100)
    return [r for r in runs if r.data.tags.get("orch.role") == "trial"]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs")
    code = main(["submit", str(STUDIES / "distill.yaml"), "--workdir", str(workdir)])
    return workdir, code


def test_two_concurrent_trials_share_one_teacher_training(distilled):
    workdir, code = distilled
    assert code == 0
    teachers = list((workdir / "teachers" / "trials").iterdir())
    assert len(teachers) == 1 and (teachers[0] / TEACHER_FILE).exists()
    runs = teacher_runs(workdir / "distill")
    assert len(runs) == 1, "the teacher was trained more than once"
    teacher = runs[0]
    assert teacher.data.tags["orch.status"] == "completed" and teacher.data.params["train.steps"] == "80"
    assert "eval/kl/nfe_1" in teacher.data.metrics  # the teacher's own quality is tracked
    students = trial_runs(workdir / "distill", "distill")
    assert len(students) == 2
    assert {r.data.tags["orch.teacher"] for r in students} == {teachers[0].name}
    for run in students:
        assert run.data.metrics["cost/fwd_per_sample"] == pytest.approx(3.0)  # teacher forwards counted


def test_another_study_reuses_the_cached_teacher_and_a_named_one_is_used_as_given(distilled, tmp_path):
    workdir, _ = distilled
    raw = yaml.safe_load((STUDIES / "distill.yaml").read_text())
    raw["name"] = "distill_again"
    raw["grid"] = {"method.name": ["scd"]}
    other = tmp_path / "distill_again.yaml"
    other.write_text(yaml.safe_dump(raw))
    assert main(["submit", str(other), "--workdir", str(workdir), "--backend", "local"]) == 0
    assert teacher_runs(workdir / "distill_again") == []  # nothing trained: the cache answered
    (student,) = trial_runs(workdir / "distill_again", "distill_again")
    cached = next((workdir / "teachers" / "trials").iterdir())
    assert student.data.tags["orch.teacher"] == cached.name

    # a teacher named by path: here the directory of a trial of the first study
    trial_dir = next((workdir / "distill" / "trials").iterdir())
    raw["name"], raw["base"]["method"]["teacher"] = "named_teacher", {"path": str(trial_dir)}
    named = tmp_path / "named.yaml"
    named.write_text(yaml.safe_dump(raw))
    assert main(["submit", str(named), "--workdir", str(workdir), "--backend", "local"]) == 0
    (student,) = trial_runs(workdir / "named_teacher", "named_teacher")
    assert student.data.tags["orch.teacher"] == str(trial_dir)


def test_an_autoguided_student_has_its_weak_teacher_trained_first_and_counts_its_passes(distilled, tmp_path, capsys):
    """AYF-EMD autoguided by a planned weak teacher: `orch plan` lists it, the driver trains it (the teacher comes
    from the cache), and the student's passes count both teachers."""
    workdir, _ = distilled
    raw = yaml.safe_load((STUDIES / "distill.yaml").read_text())
    raw["name"], raw["grid"] = "autoguided", {"train.seed": [0]}
    raw["base"]["method"] = {"name": "ayf_emd", "teacher": {"steps": 80, "batch_size": 256},
                             "autoguide": {"steps": 20, "weight": 2.0}}  # fmt: skip
    study = tmp_path / "autoguided.yaml"
    study.write_text(yaml.safe_dump(raw))
    assert main(["plan", str(study)]) == 0
    assert "20 steps, the weak teacher that autoguides 1 trial(s)" in capsys.readouterr().out
    assert main(["submit", str(study), "--workdir", str(workdir), "--backend", "local"]) == 0
    (weak,) = teacher_runs(workdir / "autoguided")  # the strong teacher came from the cache
    assert weak.data.params["train.steps"] == "20" and weak.data.tags["orch.status"] == "completed"
    (student,) = trial_runs(workdir / "autoguided", "autoguided")
    assert student.data.tags["orch.guide"].endswith(f"{weak.data.tags['orch.trial_id']}/{TEACHER_FILE}")
    assert student.data.metrics["cost/fwd_per_sample"] == pytest.approx(3.0)  # student, teacher, weak teacher
    assert student.data.metrics["cost/jvp_per_sample"] == pytest.approx(1.0)


def test_a_missing_or_corrupt_teacher_is_a_clear_error(tmp_path, capsys):
    raw = yaml.safe_load((STUDIES / "distill.yaml").read_text())
    raw["base"]["method"]["teacher"] = {"path": str(tmp_path / "nowhere.pt")}
    study = tmp_path / "missing.yaml"
    study.write_text(yaml.safe_dump(raw))
    assert main(["submit", str(study), "--workdir", str(tmp_path / "runs")]) == 2  # checked where it would run
    assert "method.teacher.path" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert main(["validate", str(study)]) == 0  # a study for another machine validates here

    corrupt = tmp_path / "teacher.pt"
    corrupt.write_bytes(b"not a checkpoint")
    raw["base"]["method"]["teacher"] = {"path": str(corrupt)}
    raw["backend"] = {"name": "local"}
    study.write_text(yaml.safe_dump(raw))
    assert main(["submit", str(study), "--workdir", str(tmp_path / "runs")]) == 1
    out = capsys.readouterr()
    assert f"teacher {corrupt}: cannot load" in out.out + out.err, out.out
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'distill' / 'mlflow.db'}")
    for run in trial_runs(tmp_path / "runs" / "distill", "distill"):
        assert run.data.tags["orch.status"] == "failed" and run.info.status == "FAILED"
        traceback = client.download_artifacts(run.info.run_id, "failure/traceback.txt", str(tmp_path))
        assert "TeacherError" in Path(traceback).read_text()  # the whole traceback, as an artifact
