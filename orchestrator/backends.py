"""Where run_trial executes: in this process (`local`) or as Ray Tune trials (`ray`, embedded or a cluster)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the embedded Ray is loopback-only; a cluster sets its own
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # orch logs to MLflow itself...
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # ...and prints its own progress (verbose=0 then is silent)
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C interrupts orch, as SIGTERM does (exit 130)
# With reuse_actors, Tune waits this long for a finished trial's thread (its last MLflow writes) before reuse.
os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")

import psutil
import ray  # noqa: E402 — after the environment it reads
from ray import tune  # noqa: E402
from ray._private import ray_constants  # noqa: E402
from ray.tune.logger import JsonLoggerCallback  # noqa: E402

from methods.storage import exclusive
from orchestrator.progress import Progress
from orchestrator.runner import Trial, finish_detail, run_trial
from orchestrator.state import TrialState, read_json, write_json


def run_local(trials: list[Trial], progress: Progress) -> None:
    """Sequentially, in the `orch` process: for debugging, or where no Ray is wanted."""
    for trial in trials:
        progress.started(trial.id, TrialState.load(Path(trial.dir)).step)
        run_trial(trial, progress=lambda step, metrics, t=trial: progress.update(t.id, step, metrics))
        progress.finished(trial.id, *finish_detail(trial))


def ray_trainable(config: dict) -> None:
    """Ray Tune function trainable: loads the trial from its directory and runs it. A failure of the trial is a
    `failed` result, not an exception, so that Tune retries (max_failures) only infrastructure failures: a
    worker that died."""
    trial = Trial.load(config["trial_dir"])
    last = [0.0]

    def report(step: int, metrics: dict) -> None:
        # Every report crosses to the driver and through Tune's callbacks; a few per second keep the progress
        # view live without taking CPU from the trials (evaluations always go through).
        if time.monotonic() - last[0] >= REPORT_SECONDS or any(k.startswith(("eval/", "note")) for k in metrics):
            last[0] = time.monotonic()
            tune.report({"step": step, "orch_metrics": json.dumps(metrics)})

    tune.report({"orch_status": run_trial(trial, progress=report)})


DRIVER_RECORD = "driver.json"  # the live orch process running a study, and its embedded Ray
REPORT_SECONDS = 2.0


class StudyBusy(Exception):
    """Another live orch process is running this study."""


def alive(pid: int) -> bool:
    """Whether the process exists and has not exited (a zombie awaiting its parent's wait() has)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def process_started(pid: int) -> float | None:
    """When the process started (seconds since the epoch), or None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def driver_record(**extra) -> dict:
    """This process as a study's driver. Its start time goes with its PID: a killed driver's PID may since name
    another process (e.g. after a container restart), which must be neither waited for nor signalled."""
    return {"driver_pid": os.getpid(), "driver_started": process_started(os.getpid()), **extra}


def recorded_driver(study_dir: Path) -> dict:
    return read_json(study_dir / DRIVER_RECORD)


def live_driver(record: dict) -> int | None:
    """The PID of the driver a record names if that very process still runs."""
    pid, started = record.get("driver_pid"), record.get("driver_started")
    if not isinstance(pid, int) or not isinstance(started, float) or not alive(pid):
        return None
    return pid if abs((process_started(pid) or 0.0) - started) < 1e-3 else None


def session_processes(temp_dir: str) -> list[int]:
    """PIDs of an embedded Ray session: processes naming its temp dir, workers naming those raylets, and all
    their descendants."""
    found, raylets, procs = set(), set(), list(psutil.process_iter(["pid", "cmdline"]))
    for proc in procs:
        if any(temp_dir in part for part in proc.info["cmdline"] or []):
            found.add(proc.info["pid"])
    raylets = {str(pid) for pid in found}
    for proc in procs:
        try:
            if proc.environ().get("RAY_RAYLET_PID") in raylets:
                found.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for pid in list(found):
        try:
            found |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    return sorted(found - {os.getpid()})


def claim_study(study_dir: Path) -> None:
    """Record this process as the study's driver (`orch cancel` signals it), refusing a study that another live
    orch process is running. SIGKILLs what a killed driver left of its embedded Ray: its workers would otherwise
    keep writing to trial directories a new run is resuming."""
    with exclusive(study_dir / "driver.lock"):  # two submissions starting at once: one claims, one is refused
        previous = recorded_driver(study_dir)
        if (pid := live_driver(previous)) not in (None, os.getpid()):
            raise StudyBusy(f"study {study_dir.name!r} is being run by orch process {pid}")
        write_json(study_dir / DRIVER_RECORD, driver_record())
    if "ray_temp_dir" in previous:
        for pid in session_processes(previous["ray_temp_dir"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(previous["ray_temp_dir"], ignore_errors=True)


def release_study(study_dir: Path) -> None:
    (study_dir / DRIVER_RECORD).unlink(missing_ok=True)


def start_ray(address: str | None, study_dir: Path) -> None:
    """Connect to a Ray cluster, or start an embedded one whose processes are recorded with the study.

    ray.init replaces the driver's SIGTERM handler with one that exits with status 15; orch's own handler (an
    interrupt, as Ctrl-C) is put back, so that SIGTERM and `orch cancel` stop a study cleanly with exit 130."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        init_ray(address, study_dir)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch for a single-machine Ray (its default on macOS and Windows): with it off, the node's IP, to which
the GCS, raylet, workers and the driver bind their servers, is 127.0.0.1 instead of the machine's address."""
CLUSTERS = ray_constants.ENABLE_RAY_CLUSTER  # Ray's own setting on this platform
saved_environment: dict[str, str | None] = {}


def embedded_environment(on: bool) -> None:
    """Keep an embedded Ray on 127.0.0.1 (on), or let a connection to a cluster use the machine's address (off,
    restoring the environment). The driver reads the switch from ray_constants, which Ray evaluates at import;
    the processes Ray starts read the environment."""
    if on:
        saved_environment.setdefault(LOCAL_ONLY, os.environ.get(LOCAL_ONLY))
        os.environ[LOCAL_ONLY] = "0"
    else:
        for key, value in saved_environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        saved_environment.clear()
    ray_constants.ENABLE_RAY_CLUSTER = CLUSTERS and not on


def init_ray(address: str | None, study_dir: Path) -> None:
    embedded_environment(address is None)
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return
    temp_dir = ray_temp_dir()
    write_json(study_dir / DRIVER_RECORD, driver_record(ray_temp_dir=str(temp_dir)))
    # Workers import run_trial from this interpreter's environment: make the project importable for them.
    root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH")] if p)
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        _temp_dir=str(temp_dir),
    )


def ray_temp_dir() -> Path:
    return Path("/tmp") / f"orch-ray-{os.getpid()}"  # Unix socket paths must stay under ~100 bytes


def stop_ray() -> None:
    """Shut Ray down and remove an embedded Ray's session files (its logs; trial errors are kept by Tune and
    orch in the study directory)."""
    ray.shutdown()
    embedded_environment(False)
    shutil.rmtree(ray_temp_dir(), ignore_errors=True)


def run_ray(trials: list[Trial], study_dir: Path, backend, progress: Progress) -> None:
    """All trials as one Ray Tune run: a grid over trial directories, `reuse_actors` to avoid re-importing torch."""
    start_ray(backend.address, study_dir)
    max_concurrent, resources = backend.max_concurrent, backend.resources
    try:
        trainable = tune.with_resources(ray_trainable, {"cpu": resources.cpu, "gpu": resources.gpu})
        by_dir = {t.dir: t for t in trials}
        tuner = tune.Tuner(
            trainable,
            param_space={"trial_dir": tune.grid_search([t.dir for t in trials])},
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
        self.progress.finished(t.id, *finish_detail(t))


def say_plain(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
