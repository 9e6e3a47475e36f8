"""Teachers of distillation methods: trained once per (dataset, network, budget) and reused, also by trials
running at the same time on Ray and by other studies; a named teacher is used as given."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from orch.cli import main
from orch.execution.teachers import EXPERIMENT, TEACHER_FILE
from orch.trial.config import resolve_trial_config
from orch.trial.state import TrialState
from tests.conftest import STUDIES

ROOT = Path(__file__).resolve().parents[1]

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
    """The study submitted by `orch` in its own process, watched: (work directory, exit code, the PIDs of the GCS
    servers of every Ray it started)."""
    workdir = tmp_path_factory.mktemp("runs")
    command = [sys.executable, "-m", "orch.cli", "submit", str(STUDIES / "distill.yaml"), "--workdir", str(workdir)]
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    servers = set()
    while driver.poll() is None:
        try:
            servers |= {p.pid for p in psutil.Process(driver.pid).children(recursive=True) if p.name() == "gcs_server"}
        except psutil.Error:  # the driver or a child ended while being looked at
            pass
        time.sleep(0.2)
    return workdir, driver.returncode, servers


def test_two_concurrent_trials_share_one_teacher_training(distilled):
    workdir, code, _ = distilled
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


def test_the_teacher_and_its_students_run_on_one_ray_start(distilled):
    _, code, servers = distilled
    assert code == 0 and len(servers) == 1, servers


def test_status_lists_the_teacher_the_study_trains_first(distilled, capsys):
    workdir, code, _ = distilled
    assert code == 0
    (teacher,) = (workdir / "teachers" / "trials").iterdir()
    assert main(["status", "distill", "--workdir", str(workdir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "teachers and prior stages (trained first, shared by the work directory):"
    assert lines[1].split()[:4] == [teacher.name, "completed", "step", "80"], lines
    assert lines[-1] == "2 completed"  # the study's own trials, counted apart


def test_another_study_reuses_the_cached_teacher_and_a_named_one_is_used_as_given(distilled, tmp_path):
    workdir, _, _ = distilled
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
    workdir, _, _ = distilled
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


def test_a_missing_corrupt_or_unloadable_teacher_is_a_clear_error(tmp_path, capsys):
    """A missing or unreadable teacher file is refused at submit (exit 2, naming the option, nothing created); one
    that passes those checks but cannot be loaded into its own network (checked only when a trial starts from
    it) fails the trials that distil it, each with the whole traceback as an artifact."""
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
    study.write_text(yaml.safe_dump(raw))
    assert main(["submit", str(study), "--workdir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "method.teacher.path" in err and f"{corrupt}: cannot read" in err and not (tmp_path / "runs").exists()

    config, _ = resolve_trial_config({"method": {"name": "fm"}, "model": raw["base"]["model"]})
    torch.save({"config": config, "net": {"layers.0.weight": torch.zeros(3)}}, corrupt)  # not this network's
    raw["base"]["method"] |= {"init_from_teacher": False}  # the student does not start from it: loaded at run time
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


def stage_past_checkpoint(trial_dir: Path) -> bool:
    """Whether this trial of the teachers' directory is a stage (not the teacher), running past a checkpoint."""
    state = TrialState.load(trial_dir)
    if not (state.status == "running" and 100 <= state.step < 300 and (trial_dir / "trial.json").exists()):
        return False
    return json.loads((trial_dir / "trial.json").read_text())["config"]["method"]["name"] != "fm"


def test_a_chain_killed_during_its_stage_resumes_there_and_trains_nothing_twice(tmp_path):
    """Teacher → CMT mid-training → ECT, and teacher → ECT stage 1 → TCM, on the local backend: the whole process
    group is killed (SIGKILL) while a stage trains past its first checkpoint; the resubmission trains no teacher
    again, continues that stage from its checkpoint (no step logged twice), and the students start from the
    stages, each tagged with its stage's file."""
    raw = yaml.safe_load((STUDIES / "distill.yaml").read_text())
    raw["name"], raw["backend"] = "chain", {"name": "local"}
    raw["base"]["train"] |= {"steps": 20, "checkpoint_every": 10}
    teacher = {"steps": 60, "batch_size": 256}
    raw["grid"] = {
        "method": [
            {"name": "ect", "teacher": teacher, "mid_training": {"steps": 400, "nfe": 4}},
            {"name": "tcm", "teacher": teacher, "stage1": {"steps": 400}},
        ]
    }
    raw["base"]["method"] = {"name": "ect"}
    study = tmp_path / "chain.yaml"
    study.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "orch.cli", "submit", str(study), "--workdir", str(tmp_path / "runs")]
    driver = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL)
    stages = tmp_path / "runs" / "teachers" / "trials"
    deadline = time.time() + 300
    while not any(stage_past_checkpoint(d) for d in (stages.iterdir() if stages.exists() else [])):
        assert driver.poll() is None and time.time() < deadline, "the chain ended before it could be killed"
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = {d.name: TrialState.load(d) for d in stages.iterdir()}
    assert sum(s.status == "completed" for s in before.values()) == 1  # the teacher, and no stage yet

    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "teacher(s) to train first" not in resumed.stdout and "stage(s) to train first" in resumed.stdout
    runs = teacher_runs(tmp_path / "runs" / "chain")
    assert sorted(r.data.params["method.name"] for r in runs) == ["cmt", "ect", "fm"]  # each trained by one run
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'chain' / 'mlflow.db'}")
    for run in runs:
        assert run.data.tags["orch.status"] == "completed"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert len(steps) == len(set(steps)), f"{run.data.params['method.name']}: a step logged twice"
        every, total = int(run.data.params["train.log_every"]), int(run.data.params["train.steps"])
        assert sorted(steps) == sorted(set(range(every, total + 1, every)) | {total})  # none lost either
    students = trial_runs(tmp_path / "runs" / "chain", "chain")
    stage_files = {r.data.params["method.name"]: f"{r.data.tags['orch.trial_id']}/{TEACHER_FILE}" for r in runs}
    for run in students:
        assert run.data.tags["orch.status"] == "completed" and "orch.teacher" not in run.data.tags
        expected = stage_files["cmt" if run.data.params["method.name"] == "ect" else "ect"]
        assert run.data.tags["orch.stage"].endswith(expected)
