"""Interruption loses at most the work since the last checkpoint: the driver killed with SIGKILL mid-sweep, then
`orch resume`; and a study run on an existing Ray cluster started with `ray start --head`."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from orch.cli import main
from orch.execution.processes import is_running
from orch.lock import live_driver, process_started
from orch.trial.state import TrialState
from tests.conftest import STUDIES, recorded_processes

pytestmark = pytest.mark.slow  # starts services or trains beyond a few steps (docs/development.md)

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"


def states(study_dir: Path) -> dict[str, TrialState]:
    trials = study_dir / "trials"
    return {d.name: TrialState.load(d) for d in trials.iterdir()} if trials.exists() else {}


def trial_runs(study_dir: Path, name: str) -> list:
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=100)
    return [r for r in runs if r.data.tags.get("orch.role") == "trial"]


def submit_sweep(workdir: Path, *options: str) -> subprocess.Popen:
    """`orch submit tests/studies/sweep.yaml` in its own process, as a user runs it."""
    command = [
        sys.executable,
        "-m",
        "orch.cli",
        "submit",
        str(STUDIES / "sweep.yaml"),
        "--workdir",
        str(workdir),
    ]
    return subprocess.Popen([*command, *options], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_running_trial(driver: subprocess.Popen, study_dir: Path) -> None:
    """Until a trial of the sweep is running past its first checkpoint."""
    deadline = time.time() + 300
    while not any(s.status == "running" and s.step >= 100 for s in states(study_dir).values()):
        assert driver.poll() is None and time.time() < deadline, "the sweep ended before it could be interrupted"
        time.sleep(0.1)


def test_sigkilled_driver_resumes_the_sweep_from_checkpoints_and_falls_back_past_a_torn_one(tmp_path):
    """SIGKILL mid-sweep with one trial finished and another past two checkpoints, whose newest checkpoint is
    then torn: `orch resume` leaves the finished trial alone, continues the other from its previous checkpoint
    (the warning from the Ray worker shown by the driver), kills the frozen processes of the killed driver's
    Ray, and every step is logged exactly once."""
    study_dir = tmp_path / "sweep"
    driver = submit_sweep(tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline:  # one trial finished, another past two checkpoints and still running
        now = states(study_dir)
        done = [t for t, s in now.items() if s.status == "completed"]
        running = [t for t, s in now.items() if s.status == "running" and 200 <= s.step < 600]
        if done and running:
            break
        assert driver.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.1)
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")  # read before the freeze: a frozen writer
    logged = {t: len(client.get_metric_history(now[t].run_id, "train/loss")) for t in done}  # may hold its lock
    started = [r for r in recorded_processes(study_dir) if is_running(r)]  # Ray's servers, the trials' workers
    assert len(started) >= 3, started
    for record in started:  # frozen, as on a hung machine: no worker writes after the kill
        with contextlib.suppress(ProcessLookupError):
            os.kill(record["pid"], signal.SIGSTOP)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = states(study_dir)
    newest = sorted((study_dir / "trials" / running[0] / "checkpoints").glob("step_*.pt"))[-1]
    newest.write_bytes(b"torn")

    resume = subprocess.run([sys.executable, "-m", "orch.cli", "resume", "sweep", "--workdir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resume.returncode == 0, resume.stdout + resume.stderr
    assert f"warning: checkpoint {newest} is unreadable" in resume.stdout  # from the Ray worker, by the driver
    assert not [r for r in started if is_running(r)], "processes of the killed driver were left running"
    runs = trial_runs(study_dir, "sweep")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)  # one run per trial, none stale
    after = states(study_dir)
    for trial_id, state in after.items():
        assert state.status == "completed" and state.run_id == before[trial_id].run_id
        for key in ("train/loss", "train/grad_norm", "eval/kl/nfe_1"):
            steps = [m.step for m in client.get_metric_history(state.run_id, key)]
            assert len(steps) == len(set(steps)), f"{trial_id}: {key} logged twice at some step: {sorted(steps)}"
        steps = sorted(m.step for m in client.get_metric_history(state.run_id, "train/loss"))
        assert steps == list(range(20, 601, 20)), (trial_id, before[trial_id].step, steps)
    for trial_id in done:  # finished trials untouched: not re-run, not re-logged
        assert after[trial_id].updated == before[trial_id].updated
        assert len(client.get_metric_history(after[trial_id].run_id, "train/loss")) == logged[trial_id]


def stop_ray_head(temp_dir: str) -> None:
    """Kill the processes of the Ray cluster started with this temp dir, and only those (`ray stop` ends every
    Ray on the machine, the other test worker's included)."""
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir + "/" in part or part.endswith("=" + temp_dir) for part in process.info["cmdline"] or []):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_study_runs_on_an_existing_ray_cluster(tmp_path):
    port = free_port()
    head = [str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
            "--disable-usage-stats", f"--temp-dir=/tmp/orch-head-{port}"]  # fmt: skip
    started = subprocess.run(head, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]  # (a socket path over ~100 bytes breaks Ray)
    try:
        address = f"127.0.0.1:{port}"
        assert main(["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(tmp_path), "--ray-address", address]) == 0
        assert {s.status for s in states(tmp_path / "tiny").values()} == {"completed"}
        assert len(trial_runs(tmp_path / "tiny", "tiny")) == 4
        head_logs = Path(f"/tmp/orch-head-{port}/session_latest/logs")
        assert list(head_logs.glob("python-core-driver-*")), "orch's driver did not connect to the cluster"
        assert not (tmp_path / "tiny" / "driver.json").exists()  # the study's claim released
    finally:
        stop_ray_head(f"/tmp/orch-head-{port}")


def test_cancel_stops_a_running_ray_study_and_resume_finishes_it(tmp_path):
    study_dir = tmp_path / "sweep"
    driver = submit_sweep(tmp_path)
    wait_for_running_trial(driver, study_dir)
    assert main(["cancel", "sweep", "--workdir", str(tmp_path)]) == 0
    assert driver.wait(60) == 130  # the driver stopped as on Ctrl-C
    cancelled = {t: s for t, s in states(study_dir).items() if s.status == "cancelled"}
    assert cancelled and all(s.status in ("cancelled", "completed") for s in states(study_dir).values())
    runs = {r.info.run_id: r for r in trial_runs(study_dir, "sweep")}
    assert all(runs[s.run_id].info.status == "KILLED" for s in cancelled.values())
    assert main(["resume", "sweep", "--workdir", str(tmp_path)]) == 0
    assert {s.status for s in states(study_dir).values()} == {"completed"}


def test_a_running_local_study_refuses_a_second_driver_and_stops_on_cancel(tmp_path, capsys):
    study_dir = tmp_path / "sweep"
    driver = submit_sweep(tmp_path, "--backend", "local")
    wait_for_running_trial(driver, study_dir)
    second = ["submit", str(STUDIES / "sweep.yaml"), "--workdir", str(tmp_path), "--backend", "local"]
    assert main(second) == 1
    assert f"being run by orch process {driver.pid}" in capsys.readouterr().err
    assert driver.poll() is None and json.loads((study_dir / "driver.json").read_text())["driver_pid"] == driver.pid

    assert main(["cancel", "sweep", "--workdir", str(tmp_path)]) == 0
    assert driver.wait(60) == 130  # the in-process trial stopped with its driver, as on Ctrl-C
    after = states(study_dir)
    cancelled = {t: s for t, s in after.items() if s.status == "cancelled"}
    assert cancelled and all(s.status in ("cancelled", "completed") for s in after.values())
    for trial_id, state in cancelled.items():  # checkpoints kept for `orch resume`
        assert (
            state.step == 0 or (study_dir / "trials" / trial_id / "checkpoints" / f"step_{state.step:09d}.pt").exists()
        )
    runs = {r.info.run_id: r for r in trial_runs(study_dir, "sweep")}
    assert all(runs[s.run_id].info.status == "KILLED" for s in cancelled.values() if s.run_id)
    assert not (study_dir / "driver.json").exists()


def test_a_stale_driver_record_naming_a_reused_pid_is_neither_refused_nor_signalled(tmp_path):
    """After a crash, the PID a driver record names may since belong to another process (e.g. after a container
    restart): its start time tells them apart."""
    tiny = ["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(tmp_path), "--backend", "local"]
    assert main(tiny) == 0
    stranger = subprocess.Popen(["sleep", "120"])
    try:
        started = process_started(stranger.pid)
        assert live_driver({"driver_pid": stranger.pid, "driver_started": started}) == stranger.pid
        stale = {"driver_pid": stranger.pid, "driver_started": started - 1}  # the crashed driver's
        (tmp_path / "tiny" / "driver.json").write_text(json.dumps(stale))
        assert main(["cancel", "tiny", "--workdir", str(tmp_path)]) == 0
        assert stranger.poll() is None  # not signalled
        assert main(tiny) == 0  # not refused: the study is claimed and (already finished) run
        assert stranger.poll() is None and not (tmp_path / "tiny" / "driver.json").exists()
    finally:
        stranger.kill()
        stranger.wait()


def worker_of(trial_dir: Path, other_than: int | None = None, seconds: float = 300) -> int:
    """The PID of the process recording the trial (its writer lock names it), once it is not `other_than`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            pid = json.loads((trial_dir / "writer.lock").read_text())["pid"]
            if pid != other_than and TrialState.load(trial_dir).status == "running":
                return pid
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError("no worker took the trial")


def test_a_trial_whose_worker_dies_more_than_max_failures_times_is_failed_with_its_reason(tmp_path):
    """Tune retries a trial whose worker died (max_failures: 1) and gives up on the second death: the trial is
    `failed` with the reason, its MLflow run ended FAILED (not RUNNING forever), and `orch resume` finishes it."""
    # a third of the study's steps: the two deaths come early, and resume trains the rest
    submit = ["submit", str(STUDIES / "long.yaml"), "--backend", "ray", "backend.max_failures=1", "train.steps=1000"]
    driver = subprocess.Popen([sys.executable, "-m", "orch.cli", *submit, "--workdir", str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    trials = tmp_path / "long" / "trials"
    deadline = time.time() + 120
    while not (trials.exists() and any(trials.iterdir())):
        assert driver.poll() is None and time.time() < deadline, driver.stdout.read()
        time.sleep(0.1)
    (trial_dir,) = trials.iterdir()
    first = worker_of(trial_dir)
    os.kill(first, signal.SIGKILL)
    os.kill(worker_of(trial_dir, other_than=first), signal.SIGKILL)  # the retry's worker
    out = driver.communicate(timeout=300)[0]
    assert driver.returncode == 1, out

    state = TrialState.load(trial_dir)
    assert state.status == "failed" and state.reason.startswith("worker died 2 time(s): "), state.reason
    assert "no error recorded" not in state.reason  # the failure's line, e.g. Ray's "The actor died …"
    (run,) = trial_runs(tmp_path / "long", "long")
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert run.data.tags["orch.status"] == "failed"
    assert main(["resume", "long", "--workdir", str(tmp_path)]) == 0
    assert TrialState.load(trial_dir).status == "completed"
