"""The Slurm backend on a real single-node Slurm (Debian's packages, brought up by tests/slurm/up.sh): a study
runs as a job array, `scontrol requeue` of a running job resumes it from its checkpoint, and status, cancel and
resume work on live jobs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orch.backends.slurm import queue_states, slurm_command
from orch.cli import main
from orch.trial.state import TrialState
from tests.conftest import STUDIES

pytestmark = pytest.mark.slow  # the suite's one Slurm: this file runs on one xdist worker (--dist loadfile)

UP = Path(__file__).resolve().parent / "slurm" / "up.sh"
DOWN = UP.with_name("down.sh")


@pytest.fixture(scope="module")
def slurm():
    """A running single-node Slurm, stopped afterwards when this fixture started it."""
    already_up = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0
    subprocess.run(["sh", str(UP)], check=True, timeout=300)
    yield
    if not already_up:
        subprocess.run(["sh", str(DOWN)], check=True, timeout=60)


def orch(*args: str) -> subprocess.Popen:
    """`orch` in its own process, as a user runs it (it installs signal handlers, so not in a thread)."""
    return subprocess.Popen([sys.executable, "-m", "orch.cli", *args], stdout=subprocess.DEVNULL)


def job_processes(job_id: str) -> list[int]:
    """PIDs of the Python processes a Slurm job (or array task, `<array>_<task>`) runs (found by the job ids in
    their environment)."""
    array_id, _, task = job_id.partition("_")
    ids = {"SLURM_ARRAY_JOB_ID": array_id, "SLURM_ARRAY_TASK_ID": task} if task else {"SLURM_JOB_ID": job_id}
    marks = [f"{key}={value}".encode() for key, value in ids.items()]
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"python" in cmdline.split(b"\0")[0] and b"submitit" in cmdline and all(m in environ for m in marks):
            found.append(int(proc.name))
    return found


def wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := condition():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def history(study_dir: Path, run_id: str, key: str = "train/loss") -> list[int]:
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    return [m.step for m in client.get_metric_history(run_id, key)]


def long_study(tmp_path: Path, name: str, steps: int, seeds: int = 2) -> Path:
    """slurm_tiny with `steps` steps, checkpointed every 100, and `seeds` trials."""
    raw = yaml.safe_load((STUDIES / "slurm_tiny.yaml").read_text())
    raw["name"] = name
    raw["grid"]["train.seed"] = list(range(seeds))
    raw["base"]["train"] |= {"steps": steps, "checkpoint_every": 100, "log_every": 20}
    raw["base"]["eval"]["every"] = steps
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def first_checkpointed(study_dir: Path, step: int) -> Path:
    """The directory of the first trial whose state reports a checkpoint at `step` or later."""
    trials = study_dir / "trials"
    return wait_for(
        lambda: next((d for d in trials.glob("*") if TrialState.load(d).step >= step), None),
        240,
        f"a checkpoint at step {step}",
    )


def test_the_local_slurm_listens_on_loopback_only(slurm):
    from tests.test_hardening import is_loopback, listeners

    daemons = {}
    for name in ("slurmctld", "slurmd"):
        for pid in subprocess.run(["pgrep", "-x", name], capture_output=True, text=True, check=True).stdout.split():
            daemons |= listeners(int(pid))
    assert set(daemons) == {"slurmctld", "slurmd"}
    assert all(is_loopback(ip) for ips in daemons.values() for ip in ips), daemons


def test_a_study_runs_as_a_job_array(slurm, tmp_path, capsys):
    assert main(["submit", str(STUDIES / "slurm_tiny.yaml"), "--workdir", str(tmp_path)]) == 0
    study_dir = tmp_path / "slurm_tiny"
    jobs = [json.loads((d / "job.json").read_text()) for d in (study_dir / "trials").iterdir()]
    assert len({j["job_id"].split("_")[0] for j in jobs}) == 1  # one array
    for trial_dir in (study_dir / "trials").iterdir():
        state = TrialState.load(trial_dir)
        assert state.status == "completed" and state.job_id is not None
    capsys.readouterr()
    assert main(["status", "slurm_tiny", "--workdir", str(tmp_path)]) == 0
    assert "[slurm " in capsys.readouterr().out
    # orch eval through the study's backend: a job per trial; the last checkpoint at the trials' own sample
    # count and seed range 0 reproduces their last evaluation exactly
    assert main(["eval", "slurm_tiny", "--workdir", str(tmp_path), "--backend", "slurm", "--checkpoint", "last"]) == 0
    out = capsys.readouterr().out
    assert "4 evaluation(s) computed for 2 trial(s)" in out and out.count("seed range 0") == 4
    arrays = {f.name.split("_")[0] for f in (study_dir / "slurm").iterdir() if not f.name.startswith(".")}
    assert len(arrays) == 2  # the submission's job array and the evaluation's
    for trial_dir in (study_dir / "trials").iterdir():
        result = TrialState.load(trial_dir).result
        units = json.loads((trial_dir / "final.json").read_text())["units"]
        assert {k: u["value"] for k, u in units.items()} == {
            f"final/kl/nfe_{n}/seed_0": result[f"eval/kl/nfe_{n}"] for n in (1, 2)
        }


def test_a_ray_study_sent_to_slurm_from_the_command_line_runs_with_what_the_cluster_asks_for(slurm, tmp_path):
    """`--backend slurm` on a Ray study with an account, a QOS, a setup line and an sbatch option of its own: the
    options reach sbatch (slurmctld records them) and the setup line runs in the job before its trial."""
    mark = tmp_path / "setup_ran"
    args = ["submit", str(STUDIES / "tiny.yaml"), "method.name=[lsd]", "train.seed=[0]", "--backend", "slurm",
            "backend.account=lab", "backend.qos=normal", f"backend.setup=['touch {mark}']",
            "backend.additional_parameters={comment: orch-test}", "--workdir", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    (trial,) = (tmp_path / "tiny" / "trials").iterdir()
    assert TrialState.load(trial).status == "completed" and mark.exists()
    job = json.loads((trial / "job.json").read_text())["job_id"]
    shown = slurm_command("scontrol", "show", "job", job)  # completed jobs are kept for MinJobAge (300 s)
    assert "Account=lab" in shown and "Comment=orch-test" in shown
    script = (tmp_path / "tiny" / "slurm" / job / f"{job}_submission.sh").read_text()  # what sbatch was given
    assert "#SBATCH --qos=normal\n" in script  # (slurmctld records a QOS only with an accounting database)


def test_a_requeued_job_resumes_from_its_checkpoint(slurm, tmp_path):
    study = long_study(tmp_path, "slurm_requeue", 1500, seeds=1)
    study_dir = tmp_path / "slurm_requeue"
    driver = orch("submit", str(study), "--workdir", str(tmp_path))
    trial_dir = first_checkpointed(study_dir, 200)
    assert TrialState.load(trial_dir).step < 1500  # requeued mid-run
    job_id = json.loads((trial_dir / "job.json").read_text())["job_id"]
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_for(lambda: queue_states().get(job_id) == "PENDING", 60, "the requeued job back in the queue")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)  # skip Slurm's delay
    assert driver.wait(600) == 0
    state = TrialState.load(trial_dir)
    assert state.status == "completed"
    restarts = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts
    # Metrics reach MLflow at checkpoints, so a job that restarted from scratch would log the steps up to the
    # checkpoint we saw a second time; resumed from it, every step is logged once, in the same run.
    steps = history(study_dir, state.run_id)
    assert sorted(steps) == list(range(20, 1501, 20))


def test_cancel_then_resume_finishes_from_the_checkpoints(slurm, tmp_path, capsys):
    study = long_study(tmp_path, "slurm_cancel", 3000)
    study_dir = tmp_path / "slurm_cancel"
    driver = orch("submit", str(study), "--workdir", str(tmp_path))
    wait_for(
        lambda: (
            all(TrialState.load(d).step >= 100 for d in (study_dir / "trials").glob("*"))
            and len(list((study_dir / "trials").glob("*"))) == 2
        ),
        240,
        "both trials past a checkpoint",
    )
    assert main(["cancel", "slurm_cancel", "--workdir", str(tmp_path)]) == 0
    assert driver.wait(120) == 130  # the watching driver stopped as on Ctrl-C
    states = {d.name: TrialState.load(d) for d in (study_dir / "trials").iterdir()}
    assert {s.status for s in states.values()} == {"cancelled"}
    assert all(0 < s.step < 3000 for s in states.values())
    assert main(["resume", "slurm_cancel", "--workdir", str(tmp_path)]) == 0
    for trial_dir in (study_dir / "trials").iterdir():
        state = TrialState.load(trial_dir)
        assert state.status == "completed"
        assert sorted(history(study_dir, state.run_id)) == list(range(20, 3001, 20))  # resumed, not restarted
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("slurm_cancel").experiment_id])
    assert sum(r.data.tags.get("orch.role") == "trial" for r in runs) == 2  # the same run per trial throughout


def test_a_job_that_dies_without_an_outcome_is_retried(slurm, tmp_path):
    """backend.max_failures covers infrastructure failures: SIGKILL the job's Python process (as the OOM killer or a
    node failure would) and the driver resubmits the trial, which resumes from its checkpoint."""
    study = long_study(tmp_path, "slurm_retry", 1500, seeds=1)
    study_dir = tmp_path / "slurm_retry"
    driver = orch("submit", str(study), "--workdir", str(tmp_path))
    trial_dir = first_checkpointed(study_dir, 200)
    first = json.loads((trial_dir / "job.json").read_text())
    workers = job_processes(first["job_id"])
    assert workers, "the job's Python process was not found"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    assert driver.wait(600) == 0
    second = json.loads((trial_dir / "job.json").read_text())
    assert second["attempt"] == 2 and second["job_id"] != first["job_id"]
    state = TrialState.load(trial_dir)
    assert state.status == "completed"
    assert sorted(history(study_dir, state.run_id)) == list(range(20, 1501, 20))  # resumed, not restarted


def test_a_two_task_job_next_to_a_one_task_job_trains_what_one_process_does(slurm, tmp_path):
    mixed = ["submit", str(STUDIES / "parallel_mixed.yaml"), "backend.name=slurm", "backend.timeout_min=10"]
    assert main([*mixed, "--workdir", str(tmp_path / "two")]) == 0  # lsd as a 2-task job, meanflow as a 1-task one
    one = ["submit", str(STUDIES / "parallel.yaml"), "--backend", "local", "--workdir", str(tmp_path / "one")]
    assert main(one) == 0
    two, one = tmp_path / "two" / "parallel_mixed" / "trials", tmp_path / "one" / "parallel" / "trials"
    for trial_dir in one.iterdir():  # the same trial ids: where and on how many tasks a trial runs is not in its id
        state, parallel = TrialState.load(trial_dir), TrialState.load(two / trial_dir.name)
        assert parallel.status == state.status == "completed" and parallel.job_id is not None
        assert parallel.result.keys() == state.result.keys() and state.result
        for key, value in state.result.items():
            assert parallel.result[key] == pytest.approx(value, rel=1e-4), key
    logs = [f.name for f in (tmp_path / "two" / "parallel_mixed" / "slurm").glob("*/*_log.out")]
    assert len(logs) == 3, logs  # three tasks in all: two of lsd's job, one of meanflow's


def test_the_suite_stops_the_slurm_it_starts():
    """Last in this file: it stops the Slurm the other tests use, then lets a pytest run start and stop its own."""
    subprocess.run(["sh", str(DOWN)], check=True, timeout=60)  # from nothing, as on a fresh machine
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_slurm.py::test_the_local_slurm_listens_on_loopback_only"],
                          cwd=UP.parents[2], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]
    left = subprocess.run(["pgrep", "-a", "slurmctld|slurmd|munged"], capture_output=True, text=True).stdout
    assert not left, f"left running: {left}"
