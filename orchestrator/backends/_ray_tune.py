"""Ray Tune for the ray backend: an embedded local Ray (on loopback) or a cluster, a grid of trial directories as
one Tune run, and progress from Tune's trial events. Imported only when the ray backend runs (it imports Ray)."""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray._private import ray_constants
from ray._raylet import AuthenticationTokenLoader, Config
from ray.tune.logger import JsonLoggerCallback

from orch.execution.distributed import TIMEOUT
from orch.execution.processes import children, record_children, record_process
from orch.execution.ranks import ProgressReader, request_stop, reset_channel, run_rank
from orch.execution.records import finish_unrun
from orch.execution.runner import run_trial
from orch.execution.trial import EarlyStopped, Trial, finish_detail
from orch.lock import note_in_record
from orch.methods.runtime.storage import exclusive
from orch.progress import Progress
from orch.tracking.schema import is_eval_key
from orch.trial.state import WRITER_LOCK, TrialState
from orch.trial.status import OUTCOMES, STOPPED

REPORT_SECONDS = 2.0
POLL_SECONDS = 0.5
"""How often the Tune trial of a data-parallel trial reads rank 0's progress log."""


def ray_trainable(config: dict) -> None:
    """Ray Tune function trainable: loads the trial from its directory and runs it. A failure of the trial is a
    `failed` result, not an exception, so that Tune retries (max_failures) only infrastructure failures: a
    worker that died."""
    record_process()
    trial = Trial.load(config["trial_dir"])
    last = [0.0]

    def report(step: int, metrics: dict) -> None:
        # Every report crosses to the driver and through Tune's callbacks; a few per second keep the progress
        # view live without taking CPU from the trials (evaluations always go through).
        if time.monotonic() - last[0] >= REPORT_SECONDS or any(is_eval_key(k) or k == "note" for k in metrics):
            last[0] = time.monotonic()
            tune.report({"step": step, "orch_metrics": json.dumps(metrics)})

    tune.report({"orch_status": run_on_workers(trial, config, report)})


def run_on_workers(trial: Trial, config: dict, progress: Callable[[int, dict], None]) -> str:
    """run_trial of the trial, here or, with more than one worker (its train.workers, else config["workers"]),
    on a Ray Train worker group; returns
    its status. `progress` gets the trial's progress either way; when it raises EarlyStopped (a search's
    scheduler stopped the trial), a data-parallel trial is told to stop at its next tick and waited for, and
    the status is `stopped` even if it completed before the request reached it (the caller must then not
    report again; the trial directory records what happened)."""
    workers = trial.config["train"].get("workers") or config["workers"]
    if workers == 1:
        return run_trial(trial, progress=progress)
    reset_channel(trial.dir)
    failure: list[BaseException] = []
    fit = threading.Thread(
        target=lambda: capture(failure, train_data_parallel, trial, workers, config["gpu"], config["cpu"]),
        daemon=True,
    )
    fit.start()
    forward = ProgressReader(trial.dir, progress)
    while fit.is_alive():
        fit.join(POLL_SECONDS)  # a search's stop reaches rank 0 within a second
        try:
            forward()
        except EarlyStopped:
            request_stop(trial.dir)
            fit.join()
            return STOPPED
    status = finish_detail(trial)[0]
    if failure and status not in OUTCOMES:  # rank 0 recorded no outcome: Tune retries
        raise failure[0]
    return status


def capture(failure: list[BaseException], fn: Callable, *args) -> None:
    try:
        fn(*args)
    except BaseException as e:  # handed to the thread that waits for it
        failure.append(e)


def ray_train_worker(config: dict) -> None:
    """A Ray Train worker of a data-parallel trial (Ray Train has joined it to the trial's process group)."""
    record_process()
    run_rank(config["trial_dir"])


def train_data_parallel(trial: Trial, workers: int, gpu: float, cpu: float) -> None:
    """The trial as a Ray Train TorchTrainer run of `workers` workers with these resources each; rank 0 records
    it in the trial directory and its MLflow run as a one-worker trial does."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cpu} | ({"GPU": gpu} if gpu else {})
    TorchTrainer(
        ray_train_worker,
        train_loop_config={"trial_dir": trial.dir},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo", timeout_s=int(TIMEOUT.total_seconds())),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(gpu), resources_per_worker=resources),
        run_config=RunConfig(
            name=f"train-{trial.id}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(Path(trial.dir, "ray_train").resolve()),
            failure_config=FailureConfig(max_failures=0),  # Tune's max_failures retries the whole trial
        ),
    ).fit()


held: dict[str, Any] = {}
"""While a driver holds Ray for a whole submission (hold_ray): the study directory it is for, and whether it runs."""


@contextmanager
def hold_ray(study_dir: Path):
    """One Ray for everything a submission runs (teachers, stages, trials, a search): the first start_ray in the
    block starts it, with the study's records; start_ray and stop_ray in the block then leave it as it is; it stops
    when the block ends."""
    held.update(study_dir=study_dir, running=False)
    try:
        yield
    finally:
        running = held.get("running")
        held.clear()
        if running:
            stop_ray()


def start_ray(address: str | None, study_dir: Path) -> None:
    """Connect to a Ray cluster, or start an embedded one whose processes are recorded with the study (with the
    held study's, under hold_ray, which may have started it already).

    ray.init replaces the driver's SIGTERM handler with one that exits with status 15; orch's own handler (an
    interrupt, as Ctrl-C) is put back, so that SIGTERM and `orch cancel` stop a study cleanly with exit 130."""
    if held.get("running"):
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        init_ray(address, held.get("study_dir", study_dir))
        if held:
            held["running"] = True
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch for a single-machine Ray (its default on macOS and Windows): with it off, the node's IP, to which
the GCS, raylet, workers and the driver bind their servers, is 127.0.0.1 instead of the machine's address."""
CLUSTERS = ray_constants.ENABLE_RAY_CLUSTER  # Ray's own setting on this platform
RAY_TOKEN = "ray_token"
"""<study>/ray_token: the embedded Ray's authentication token (0600), new at each start."""
saved_environment: dict[str, str | None] = {}
session: dict[str, str] = {}
"""What the embedded Ray of this process left to remove when it stops: its temp dir and token file."""


def embedded_environment(token: Path | None) -> None:
    """Keep an embedded Ray on 127.0.0.1 with token authentication, every process of it (servers, workers, this
    driver) reading the token from the file `token`; or, with None, let a connection to a cluster use the
    machine's address and the user's own authentication settings (restoring the environment). The driver reads
    the address switch from ray_constants, which Ray evaluates at import, and the authentication mode from its
    config, refreshed here; the processes Ray starts read the environment."""
    embedded = {LOCAL_ONLY: "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)} if token else {}
    for key, value in embedded.items():
        saved_environment.setdefault(key, os.environ.get(key))
        os.environ[key] = value
    if token is None:
        for key, value in saved_environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        saved_environment.clear()
    ray_constants.ENABLE_RAY_CLUSTER = CLUSTERS and token is None
    Config.initialize("")  # Ray's authentication mode, from the environment
    AuthenticationTokenLoader.instance().reset_cache()


def new_token(study_dir: Path) -> Path:
    """A fresh random token in <study>/ray_token, readable by this user only (even under `orch --share`)."""
    path = study_dir / RAY_TOKEN
    session["token"] = str(path)  # removed when Ray stops
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, secrets.token_hex(32).encode())
    finally:
        os.close(descriptor)
    return path


def init_ray(address: str | None, study_dir: Path) -> None:
    embedded_environment(None if address else new_token(study_dir))
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return
    # In a directory of its own, 0700 and unpredictable (Ray makes its temp dir world-writable, so it goes one
    # level below); under /tmp, as Unix socket paths must stay under ~100 bytes.
    temp_dir = session["temp_dir"] = tempfile.mkdtemp(prefix="orch-ray-", dir="/tmp")
    note_in_record(study_dir, ray_temp_dir=temp_dir)  # a later driver removes what a killed one left
    # Workers import run_trial from this interpreter's environment: make the project importable for them.
    root = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH")] if p)
    before = children()
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        _temp_dir=f"{temp_dir}/ray",
    )
    record_children(before)  # Ray's servers; its workers record themselves when they take work


def stop_ray() -> None:
    """Shut Ray down and remove an embedded Ray's session files (its logs; trial errors are kept by Tune and
    orch in the study directory); under hold_ray, nothing until the block ends."""
    if held.get("running"):
        return
    ray.shutdown()
    embedded_environment(None)
    if token := session.pop("token", None):
        Path(token).unlink(missing_ok=True)
    if temp_dir := session.pop("temp_dir", None):
        shutil.rmtree(temp_dir, ignore_errors=True)


def call(fn: Callable[[str], Any], item: str) -> Any:
    record_process()
    return fn(item)


def map_tasks(fn: Callable[[str], Any], items: list[str], study_dir: Path, backend) -> list[Any]:
    """fn(item) as Ray tasks, each with the backend's per-trial resources; the results in order."""
    start_ray(backend.address, study_dir)
    try:
        task = ray.remote(num_cpus=backend.resources.cpu, num_gpus=backend.resources.gpu, max_retries=0)(call)
        return ray.get([task.remote(fn, item) for item in items])
    finally:
        stop_ray()


def tune_trial_resources(backend, workers: int) -> tune.PlacementGroupFactory:
    """What the Tune trial of a trial with `workers` workers reserves: the trial's resources, or for a
    data-parallel trial, which only waits for its Ray Train workers (they hold the resources), no CPU: any share
    would keep a worker group that needs every CPU from ever fitting."""
    if workers == 1:
        return tune.PlacementGroupFactory([{"CPU": backend.resources.cpu, "GPU": backend.resources.gpu}])
    return tune.PlacementGroupFactory([{"CPU": 0, "memory": 2**20}])


def grid_trial_resources(backend, workers: dict[str, int], config: dict) -> tune.PlacementGroupFactory:
    """tune_trial_resources of the grid trial `config` runs (`workers`: trial directory → its worker count)."""
    return tune_trial_resources(backend, workers[config["trial_dir"]])


def worker_options(backend) -> dict[str, float]:
    """The part of a Tune trial's config that says how run_on_workers runs it (a trial's train.workers aside)."""
    return {"workers": backend.workers(), "cpu": backend.resources.cpu, "gpu": backend.resources.gpu}


def run_grid(trials: list[Trial], study_dir: Path, backend, progress: Progress) -> None:
    """All trials as one Ray Tune run: a grid over trial directories, `reuse_actors` to avoid re-importing torch."""
    start_ray(backend.address, study_dir)
    max_concurrent = backend.max_concurrent
    try:
        by_dir = {t.dir: t for t in trials}
        workers = {t.dir: backend.trial_workers(t.config) for t in trials}
        trainable = tune.with_resources(ray_trainable, functools.partial(grid_trial_resources, backend, workers))
        tuner = tune.Tuner(
            trainable,
            param_space={"trial_dir": tune.grid_search([t.dir for t in trials])} | worker_options(backend),
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str((study_dir / "ray").resolve()),
                verbose=0,
                callbacks=[
                    ProgressCallback(by_dir, progress),
                    JsonLoggerCallback(),
                ],  # Tune's result.json: resume needs it
                failure_config=tune.FailureConfig(max_failures=backend.max_failures),
            ),
        )
        tuner.fit()
    finally:
        stop_ray()


class ProgressCallback(tune.Callback):
    """Feeds Tune's trial events into orch's progress view."""

    def __init__(self, trials: dict[str, Trial], progress: Progress):
        self.trials, self.progress = trials, progress

    def _trial(self, tune_trial) -> Trial:
        return self.trials[tune_trial.config["trial_dir"]]

    def on_trial_start(self, iteration, trials, trial, **info):
        t = self._trial(trial)
        self.progress.started(t.id, TrialState.load(Path(t.dir)).step)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "orch_metrics" in result:
            self.progress.update(self._trial(trial).id, result["step"], json.loads(result["orch_metrics"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        t = self._trial(trial)
        self.progress.finished(t.id, *finish_detail(t))

    def on_trial_error(self, iteration, trials, trial, **info):
        t = self._trial(trial)
        close_abandoned(t, trial)
        self.progress.finished(t.id, *finish_detail(t))


def close_abandoned(trial: Trial, tune_trial) -> None:
    """A trial Tune gave up on (its worker died more than max_failures times, or its node was lost) before it
    recorded an outcome: `failed` with the reason, its MLflow run ended FAILED; `orch resume` runs it again."""
    if TrialState.load(Path(trial.dir)).status in OUTCOMES:
        return
    with exclusive(Path(trial.dir) / WRITER_LOCK):  # the dead worker's lock is taken over
        state = TrialState.load(Path(trial.dir))
        if state.status not in OUTCOMES:
            reason = f"worker died {tune_trial.num_failures} time(s): {last_failure(tune_trial)}"
            finish_unrun(trial, state, reason)


def last_failure(tune_trial) -> str:
    """The first line of the last failure in the trial's error file (Tune writes each as a `Failure # N` header
    and the error's text), e.g. `The actor died unexpectedly before finishing this task.`"""
    path = Path(tune_trial.error_file or "")
    text = path.read_text() if path.is_file() else ""
    lines = [line.strip() for line in text.rsplit("Failure # ", 1)[-1].splitlines()[1:] if line.strip()]
    return (lines or ["no error recorded"])[0][:300]
