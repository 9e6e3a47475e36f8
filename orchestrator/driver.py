"""The driver of `orch submit`: study directory, MLflow store and runs, then the backend, then the summary."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from orchestrator.backends import claim_study, release_study, run_local, run_ray, say_plain
from orchestrator.config import Problem, metric_fingerprint
from orchestrator.progress import Progress, TrialProgress
from orchestrator.runner import Trial, missing_evaluations, open_trial, record_outcome
from orchestrator.state import (
    CANCELLED,
    FAILED,
    FINISHED_STATES,
    PENDING,
    RUNNING,
    TrialState,
    atomic_write_bytes,
    read_json,
    write_json,
)
from orchestrator.study import Backend, Search, Study, StudyError, load_study
from orchestrator.tracking import (
    GENERATION,
    ROLE,
    STATUS,
    TRACKING_ERRORS,
    default_tracking_uri,
    ensure_experiment,
    ensure_parent_run,
    environment_tags,
    find_runs,
    log_batch,
)

EXIT_OK, EXIT_FAILED = 0, 1


def tracking_uri_of(study_dir: Path) -> str:
    """The tracking URI the study was last submitted with."""
    return read_json(study_dir / "submission.json").get("tracking_uri") or default_tracking_uri(study_dir)


def study_status(study_dir: Path, ids: list[str] | None = None, generation: str | None = None) -> list[dict]:
    """Per-trial state from the trial directories (the source of truth), in plan order when ids are given; only
    the trials the study version `generation` planned when it is given."""
    trial_dirs = [study_dir / "trials" / i for i in ids] if ids else sorted((study_dir / "trials").iterdir())
    rows = []
    for trial_dir in trial_dirs:
        state = TrialState.load(trial_dir)
        label, planned_by = trial_label(trial_dir)
        if generation is not None and planned_by != generation:
            continue
        rows.append(
            {
                "id": trial_dir.name,
                "label": label,
                "status": state.status,
                "step": state.step,
                "reason": state.reason,
                "job_id": read_json(trial_dir / "job.json").get("job_id"),  # written by the Slurm backend
                "generation": planned_by,
            }
        )
    return rows


def trial_label(trial_dir: Path) -> tuple[str, str]:
    """(label, the study version that last planned it) from trial.json (rewritten at every submission), or a
    note that it is unreadable."""
    if not (trial_dir / "trial.json").exists():
        return "", ""
    try:
        trial = Trial.load(trial_dir)
    except (OSError, ValueError, TypeError, KeyError):
        return "(trial.json unreadable: submitting the study again rewrites it)", ""
    return trial.label, trial.generation


def prepare_store(study: Study, study_dir: Path, uri: str) -> tuple[MlflowClient, str, str]:
    """Create the store, the experiment and the parent run before any trial starts (a fresh sqlite store must
    not be created by several processes at once). Returns (client, experiment id, parent run id)."""
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, study.name, study_dir / "artifacts")
    tags = environment_tags() | {
        "orch.axes": json.dumps(study.axes),
        "orch.grid": json.dumps(study.resolved["grid"])[:5000],
        "orch.study_yaml": (study_dir / "study.yaml").read_text()[:5000],
        "orch.profile": study.profile or "default",
        GENERATION: study.generation,
        "orch.description": study.description[:4000],
    }
    if study.search is not None:
        tags["orch.search"] = study.search.model_dump_json()[:5000]
    parent_id = ensure_parent_run(client, experiment_id, study.name, tags)
    client.log_artifact(parent_id, str(study_dir / "study.yaml"))
    return client, experiment_id, parent_id


def prepare_trials(
    study: Study, study_dir: Path, uri: str, client: MlflowClient, experiment_id: str, parent_id: str, say
) -> tuple[list[Trial], int]:
    """One trial directory and child run per grid trial; returns the trials still to run (to train, or finished
    ones to evaluate where the eval config asks for more) and the finished count. An evaluation change never
    trains a trial again: a new metric or step count is evaluated on the final checkpoint, and a changed
    fingerprint (sample count, reference, EMA) keeps the values measured before, which the driver says."""
    todo, finished, remeasured = [], 0, []
    for spec in study.trials:
        trial, state = open_trial(client, experiment_id, parent_id, study.name, study_dir, spec, study.generation, say)
        if state.status not in FINISHED_STATES or missing_evaluations(spec.config, state):
            todo.append(trial)
        finished += state.status in FINISHED_STATES
        remeasured += [m for m, fp in state.fingerprints.items() if fp != metric_fingerprint(m, spec.config)]
    if remeasured:
        metrics = ", ".join(sorted(set(remeasured)))
        say(
            f"{len(remeasured)} finished trial(s) were evaluated with other settings of {metrics} (sample count, "
            "reference or EMA): they keep those values and their fingerprint and are not trained again; the "
            "dashboard never plots the two together"
        )
    return todo, finished


def reconcile_tracking(client: MlflowClient, experiment_id: str, study_dir: Path) -> int:
    """Make MLflow agree with the trial directories (the source of truth) for finished trials: a worker can be
    torn down between writing state.json and its last MLflow writes (e.g. Ray shutting down right after Tune
    stopped a trial). Returns the number of runs corrected."""
    runs = {r.info.run_id: r for r in find_runs(client, experiment_id, f"tags.`{ROLE}` = 'trial'")}
    fixed = 0
    for trial_dir in (study_dir / "trials").iterdir():
        state = TrialState.load(trial_dir)
        run = runs.get(state.run_id)
        if run is None or state.status not in (*FINISHED_STATES, FAILED, CANCELLED):
            continue
        if run.data.tags.get(STATUS) != state.status or run.info.status == "RUNNING":
            record_outcome(client, state.run_id, state, trial_dir)
            fixed += 1
    return fixed


def record_best(client: MlflowClient, parent_id: str, study_dir: Path, search: Search) -> dict | None:
    """The best finished sample by the searched metric, recorded on the parent run and returned."""
    candidates = []
    for trial_dir in (study_dir / "trials").iterdir():
        state = TrialState.load(trial_dir)
        if state.status in FINISHED_STATES and search.metric in state.result:
            candidates.append((state.result[search.metric], Trial.load(trial_dir)))
    if not candidates:
        return None
    value, trial = (min if search.mode == "min" else max)(candidates, key=lambda c: c[0])
    best = {
        "trial_id": trial.id,
        "label": trial.label,
        "metric": search.metric,
        "value": value,
        "params": {k: trial.factors[k] for k in search.space},
    }
    log_batch(client, parent_id, tags={"orch.best": json.dumps(best)}, params={"best.trial_id": trial.id})
    log_batch(client, parent_id, metrics=[(f"best/{search.metric}", value, 0)])
    return best


def run_grid(
    study: Study, study_dir: Path, uri: str, client, experiment_id: str, parent_id: str, backend: Backend, say
) -> list[str]:
    """Run the grid's unfinished trials; returns the ids of the study's trials."""
    todo, finished = prepare_trials(study, study_dir, uri, client, experiment_id, parent_id, say)
    evaluate = sum(TrialState.load(Path(t.dir)).status in FINISHED_STATES for t in todo)
    to_train = len(todo) - evaluate
    extra = f" ({evaluate} of them finished, to evaluate at new metrics or step counts)" if evaluate else ""
    say(f"{finished} already finished, {to_train} to run{extra} on backend {backend.name!r}")
    progress = Progress(
        {t.id: TrialProgress(t.label, t.config["train"]["steps"], TrialState.load(Path(t.dir)).step) for t in todo}
    )
    if todo and backend.name == "local":
        run_local(todo, progress)
    elif todo and backend.name == "slurm":
        from orchestrator.slurm import run_slurm

        run_slurm(todo, study_dir, study.name, backend, progress, say)
    elif todo:
        run_ray(todo, study_dir, backend, progress)
    return [t.id for t in study.trials]


def submit_study(study: Study, backend: Backend, workdir: Path, tracking_uri: str | None, say=say_plain) -> int:
    """Run the study as its one live driver; exit code per DESIGN.md. Raises StudyBusy, changing nothing, when
    another orch process is running it."""
    study_dir = (workdir / study.name).resolve()
    (study_dir / "trials").mkdir(parents=True, exist_ok=True)
    claim_study(study_dir)
    try:
        return run_study(study, backend, study_dir, tracking_uri, say)
    finally:
        release_study(study_dir)


def run_study(study: Study, backend: Backend, study_dir: Path, tracking_uri: str | None, say) -> int:
    """Run every unfinished trial of the study; write the dashboard."""
    header = f"# study {study.name!r} as last submitted" + (f", profile {study.profile!r}" if study.profile else "")
    atomic_write_bytes(
        study_dir / "study.yaml", f"{header}\n{yaml.safe_dump(study.resolved, sort_keys=False)}".encode()
    )
    uri = tracking_uri or default_tracking_uri(study_dir)
    submission = {"tracking_uri": uri, "profile": study.profile, "backend": backend.model_dump()}
    write_json(study_dir / "submission.json", submission | {"generation": study.generation, "submitted": time.time()})
    kind = f"search over {len(study.trials)} grid cell(s)" if study.search else f"{len(study.trials)} trial(s)"
    say(f"study {study.name!r}: {kind}; tracking {uri}")
    client, experiment_id, parent_id = prepare_store(study, study_dir, uri)
    started = time.time()
    try:
        if study.search is not None:
            from orchestrator.search import run_search

            search_errors = run_search(study, study_dir, uri, experiment_id, parent_id, backend, say)
            rows = study_status(study_dir, generation=study.generation)
        else:
            search_errors = 0
            ids = run_grid(study, study_dir, uri, client, experiment_id, parent_id, backend, say)
            rows = study_status(study_dir, ids)
    except KeyboardInterrupt:
        settle_interrupted(study_dir, backend, client, experiment_id, parent_id, say)
        raise
    failed = [r for r in rows if r["status"] not in FINISHED_STATES]
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    say(f"done in {time.time() - started:.0f} s: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for r in failed:
        say(f"  {r['id']} {r['label']}: {r['status']}" + (f" — {last_line(r['reason'])}" if r["reason"] else ""))
    try:
        finish_tracking(study, study_dir, client, experiment_id, parent_id, failed or search_errors, say)
    except TRACKING_ERRORS as e:
        say(
            f"error: the tracking store {uri} failed ({type(e).__name__}: {last_line(str(e))}); every result is in "
            f"{study_dir / 'trials'}: `orch resume {study.name}` rebuilds what the store lacks"
        )
        return EXIT_FAILED
    except OSError as e:
        say(f"error: cannot write the dashboard: {e}")
        return EXIT_FAILED
    say(f"MLflow:    {uri}   (browse: orch ui {study.name} --workdir {study_dir.parent})")
    return EXIT_FAILED if failed or search_errors else EXIT_OK


def last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1]


def finish_tracking(
    study: Study, study_dir: Path, client: MlflowClient, experiment_id: str, parent_id: str, failed: bool, say
) -> None:
    """Bring MLflow in line with the trial directories, end the parent run, record a search's best sample and
    write the dashboard."""
    reconcile_tracking(client, experiment_id, study_dir)
    client.set_terminated(parent_id, status="FAILED" if failed else "FINISHED")
    if study.search is not None and (best := record_best(client, parent_id, study_dir, study.search)):
        say(f"best: {best['label']} ({best['trial_id']}) {best['metric']}={best['value']:.4g}")
    from dashboards.report import build_dashboard

    dashboard = build_dashboard(client.tracking_uri, study.name, study_dir / "dashboard.html")
    client.log_artifact(parent_id, str(dashboard))
    say(f"dashboard: {dashboard}")


def settle_interrupted(
    study_dir: Path, backend: Backend, client: MlflowClient, experiment_id: str, parent_id: str, say
) -> None:
    """After Ctrl-C or SIGTERM the trials this process ran stopped with it (a local trial, or Ray's workers shut
    down): they become `cancelled`, continued by `orch resume`, and MLflow says so. Slurm jobs keep running."""
    if backend.name != "slurm":
        mark_cancelled(study_dir, (RUNNING,), "interrupted (Ctrl-C or SIGTERM); `orch resume` continues it")
    try:
        reconcile_tracking(client, experiment_id, study_dir)
        client.set_terminated(parent_id, status="KILLED")
    except TRACKING_ERRORS as e:
        say(f"warning: the tracking store failed while recording the interruption ({type(e).__name__})")


def mark_cancelled(study_dir: Path, statuses: tuple[str, ...], reason: str) -> int:
    """Mark the study's trials in `statuses` cancelled (their checkpoints stay); returns how many."""
    cancelled = 0
    for trial_dir in sorted((study_dir / "trials").iterdir()):
        state = TrialState.load(trial_dir)
        if state.status in statuses:
            state.status, state.reason = CANCELLED, reason
            state.save(trial_dir)
            cancelled += 1
    return cancelled


def prune_study(study_dir: Path, dry_run: bool, say=say_plain) -> list[str]:
    """Archive the trials that the study's current version does not plan (earlier versions' trials): each trial
    directory moves to <study>/archive/, and its MLflow run is deleted (MLflow keeps deleted runs restorable
    until `mlflow gc`). Refused while a driver runs the study. Returns the archived trial ids."""
    current = read_json(study_dir / "submission.json").get("generation")
    stale = [r["id"] for r in study_status(study_dir) if current is not None and r["generation"] not in (current, "")]
    if dry_run or not stale:
        return stale
    claim_study(study_dir)
    try:
        client = MlflowClient(tracking_uri_of(study_dir))
        for trial_id in stale:
            trial_dir = study_dir / "trials" / trial_id
            if run_id := TrialState.load(trial_dir).run_id:
                try:
                    client.delete_run(run_id)
                except TRACKING_ERRORS as e:
                    say(f"warning: trial {trial_id}: its MLflow run {run_id} was not deleted ({type(e).__name__})")
            (study_dir / "archive").mkdir(exist_ok=True)
            trial_dir.rename(study_dir / "archive" / trial_id)
    finally:
        release_study(study_dir)
    return stale


def load_submitted(study_dir: Path) -> tuple[Study, Backend, str]:
    """The study, backend and tracking URI of a study's last submission (<study>/study.yaml, submission.json).
    Raises StudyError naming the file when either is unreadable."""
    source = str(study_dir / "study.yaml")
    study = load_study(source)
    submission = read_json(study_dir / "submission.json")
    try:
        study.profile = submission["profile"]
        return study, Backend.model_validate(submission["backend"]), submission["tracking_uri"]
    except (KeyError, ValidationError) as e:
        problem = Problem(
            "", f"{study_dir / 'submission.json'} is unreadable ({type(e).__name__}); submit the study file again"
        )
        raise StudyError(source, [problem]) from None


def cancel_study(study_dir: Path, say=say_plain, wait_seconds: float = 60.0) -> int:
    """Stop a study's running trials and keep their checkpoints: scancel its Slurm jobs (first, so that none
    finishes meanwhile), signal its live driver (Ray or local runs stop with it), and mark every trial that had
    not finished `cancelled`. Returns how many."""
    from orchestrator.backends import alive, live_driver, recorded_driver

    trial_dirs = sorted((study_dir / "trials").iterdir())
    if any((d / "job.json").exists() for d in trial_dirs):
        from orchestrator.slurm import cancel_jobs

        if ids := cancel_jobs([d for d in trial_dirs if TrialState.load(d).status in (PENDING, RUNNING)]):
            say(f"cancelled Slurm job(s) {', '.join(ids)}")
    if pid := live_driver(recorded_driver(study_dir)):
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + wait_seconds
        while alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        say(f"stopped the orch process {pid} running the study")
    cancelled = mark_cancelled(study_dir, (PENDING, RUNNING), "cancelled by `orch cancel`; `orch resume` continues it")
    client = MlflowClient(tracking_uri_of(study_dir))
    experiment = client.get_experiment_by_name(study_dir.name)
    if experiment is not None:
        reconcile_tracking(client, experiment.experiment_id, study_dir)
    return cancelled
