"""The lock that serialises work across processes and hosts (teachers, FID references, claiming a study): a lock
file created with O_EXCL, which shared filesystems honour, with its holder's name and a heartbeat, taken over
when the holder is gone."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orch.methods.runtime import storage
from orch.methods.runtime.storage import exclusive

ROOT = Path(__file__).resolve().parent.parent
INCREMENT = """
import sys, time
from pathlib import Path
from orch.methods.runtime.storage import exclusive
counter = Path(sys.argv[1])
for _ in range(int(sys.argv[2])):
    with exclusive(counter.with_suffix(".lock"), poll_seconds=0.001):
        n = int(counter.read_text()) if counter.exists() else 0
        time.sleep(0.0005)  # a read-modify-write that races without the lock
        counter.write_text(str(n + 1))
"""


@pytest.mark.slow
def test_processes_holding_the_lock_in_turn_lose_no_update(tmp_path):
    counter = tmp_path / "counter"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", INCREMENT, str(counter), "50"], cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}
        )
        for _ in range(4)
    ]
    assert [w.wait(timeout=120) for w in workers] == [0] * 4
    assert counter.read_text() == "200"
    assert not counter.with_suffix(".lock").exists()  # released: the lock file is gone


def held_within(lock: Path, seconds: float) -> bool:
    """Whether this process gets the lock within `seconds`."""
    got = threading.Event()

    def take() -> None:
        with exclusive(lock, poll_seconds=0.05):
            got.set()

    threading.Thread(target=take, daemon=True).start()
    return got.wait(seconds)


def test_a_lock_whose_holder_died_on_this_host_is_taken_over_at_once(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / "work.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 1.0}))
    assert held_within(lock, 5)


def test_a_live_holder_keeps_the_lock_and_a_silent_remote_one_loses_it(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "STALE_SECONDS", 2.0)
    lock = tmp_path / "work.lock"
    me = storage.holder()
    lock.write_text(json.dumps(me))  # this very process: alive
    assert not held_within(lock, 1)
    lock.write_text(json.dumps(me | {"host": "another-node"}))  # fresh heartbeat from elsewhere: wait
    assert not held_within(lock, 1)
    old = time.time() - 10
    os.utime(lock, (old, old))  # that node went silent
    assert held_within(lock, 5)


def test_the_holder_refreshes_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "HEARTBEAT_SECONDS", 0.1)
    lock = tmp_path / "work.lock"
    with exclusive(lock):
        first = lock.stat().st_mtime
        time.sleep(0.5)
        assert lock.stat().st_mtime > first
        assert json.loads(lock.read_text())["pid"] == os.getpid()


@pytest.mark.slow
def test_trials_that_start_together_log_their_dataset_input_without_a_unique_violation(tmp_path):
    """MLflow inserts a dataset's row on first use without a lock: eight runs logging the same dataset at once
    (as concurrent trials do) must all link to it."""
    from mlflow.tracking import MlflowClient

    from orch.tracking.store import log_dataset

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("together")
    runs = [client.create_run(experiment).info.run_id for _ in range(8)]
    barrier, errors = threading.Barrier(len(runs)), []

    def start(run_id: str) -> None:
        own = MlflowClient(uri)
        barrier.wait()
        try:
            log_dataset(own, run_id, {"name": "checkerboard"})
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(run_id,)) for run_id in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert all(len(client.get_run(r).inputs.dataset_inputs) == 1 for r in runs)
