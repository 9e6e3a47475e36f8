"""The driver of `orch submit`: the study directory, the MLflow store and runs, the teachers first, then the
trials on the study's backend, then the summary and the dashboard."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from orch.backends.base import JOB_FILE, Backend, BackendParams
from orch.backends.catalog import BACKENDS, backend_of, backend_params
from orch.backends.search_space import Search
from orch.execution.processes import end_records, kill_recorded, start_records
from orch.execution.records import finish_unrun
from orch.execution.runner import missing_evaluations
from orch.execution.teachers import EXPERIMENT, TEACHER_FILE, write_teacher_file
from orch.execution.trial import Trial, open_trial
from orch.lock import alive, claim_study, live_driver, live_evaluators, recorded_driver, release_study
from orch.methods.runtime.storage import exclusive
from orch.problems import Problem, StudyError
from orch.progress import Progress, TrialProgress, say_plain
from orch.study.load import Study, load_study
from orch.tracking.schema import (
    AXES,
    BEST,
    DESCRIPTION,
    GENERATION,
    PROFILE,
    SEARCH_ARTIFACT,
    SEARCH_METRIC,
    SEARCH_MODE,
    STUDY_YAML,
)
from orch.tracking.store import (
    TRACKING_ERRORS,
    default_tracking_uri,
    ensure_experiment,
    ensure_parent_run,
    environment_tags,
    log_batch,
    rebase_artifacts,
    rebased_uri,
    reconcile,
    store_error,
)
from orch.trial.config import metric_fingerprint
from orch.trial.spec import TrialSpec
from orch.trial.state import TrialState, atomic_write_bytes, read_json, write_json
from orch.trial.status import CANCELLED, COMPLETED, FINISHED_STATES, PENDING, RUNNING

EXIT_OK, EXIT_FAILED = 0, 1


Report = Callable[[str, str, Path], Path]
"""Writes a study's page: (tracking URI, study name, output path) → the path written."""


def tracking_uri_of(study_dir: Path) -> str:
    """The tracking URI the study was last submitted with (a copied study's own once follow_move has run)."""
    return read_json(study_dir / "submission.json").get("tracking_uri") or default_tracking_uri(study_dir)


def submitted_from(study_dir: Path, submission: dict) -> Path:
    """Where the study directory was when it was last submitted (a record from before orch kept it: where it is
    now)."""
    return Path(submission.get("study_dir") or study_dir.resolve())


def follow_move(study_dir: Path) -> None:
    """A study directory copied or moved with its default store: the copy's store now names the copy's artifact
    folder, and its submission record where it is, so that nothing of it writes into the original."""
    submission = read_json(study_dir / "submission.json")
    recorded, here = submitted_from(study_dir, submission), study_dir.resolve()
    if recorded == here or submission.get("tracking_uri") != default_tracking_uri(recorded):
        return
    if (here / "mlflow.db").is_file():
        rebase_artifacts(here / "mlflow.db", (recorded / "artifacts").as_uri(), (here / "artifacts").as_uri())
    moved = {"study_dir": str(here), "tracking_uri": default_tracking_uri(here)}
    write_json(study_dir / "submission.json", submission | moved)


def moved_with_its_store(study_dir: Path) -> str | None:
    """Why a copied or moved study may not run: it was submitted elsewhere with a store other than its own
    default one, whose runs are the original's (a copy would write into them); None when it may."""
    submission = read_json(study_dir / "submission.json")
    recorded, uri = submitted_from(study_dir, submission), submission.get("tracking_uri")
    if uri is None or recorded == study_dir.resolve() or rebased_uri(uri, recorded, study_dir) != uri:
        return None
    return (
        f"{study_dir} was submitted as {recorded} with the tracking store {uri}, which holds the original's "
        "runs: submit the study file again with a store of its own (--tracking-uri)"
    )


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
                "job_id": read_json(trial_dir / JOB_FILE).get("job_id"),
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
        AXES: json.dumps(study.axes),
        STUDY_YAML: (study_dir / "study.yaml").read_text()[:5000],
        PROFILE: study.profile or "default",
        GENERATION: study.generation,
        DESCRIPTION: study.description[:4000],
    }
    if study.search is not None:
        tags |= {SEARCH_METRIC: study.search.metric, SEARCH_MODE: study.search.mode}
    parent_id = ensure_parent_run(client, experiment_id, study.name, tags)
    client.log_artifact(parent_id, str(study_dir / "study.yaml"))
    if study.search is not None:  # the search block in full: its space may be longer than a tag holds
        client.log_dict(parent_id, study.search.model_dump(), SEARCH_ARTIFACT)
    return client, experiment_id, parent_id


def open_trials(
    specs: list[TrialSpec],
    store: tuple[MlflowClient, str, str],
    study: str,
    trials_root: Path,
    generation,
    say,
    teachers: dict[str, Path] | None = None,
) -> list[tuple[Trial, TrialState]]:
    """Each spec's trial directory and child run in `trials_root` (opened as open_trial does), with the teacher
    each one distils: a planned teacher's file from `teachers`, or the path the study names."""
    client, experiment_id, parent_id = store
    return [
        open_trial(client, experiment_id, parent_id, study, trials_root, spec, generation(spec), say, teachers or {})
        for spec in specs
    ]


def run_teachers(study: Study, workdir: Path, uri: str, backend: Backend, say) -> dict[str, Path]:
    """Train the teachers and prior stages the study's trials need, first, on the study's backend, in rounds: each
    once the trials it needs itself have completed (a stage after its teacher). Once per workdir: one another
    study trained is found done and never opened again; one that another driver is training is waited for, by
    this driver, not by a worker. Returns trial id → teacher file, for the completed ones."""
    teachers_dir = workdir / "teachers"
    files: dict[str, Path] = {}
    tried: set[str] = set()
    while True:
        for spec in study.teachers:
            trial_dir = teachers_dir / "trials" / spec.id
            if spec.id not in files and TrialState.load(trial_dir).status == COMPLETED:
                teacher_file = trial_dir / TEACHER_FILE
                files[spec.id] = teacher_file if teacher_file.exists() else write_teacher_file(trial_dir, spec.config)
        untried = [s for s in study.teachers if s.id not in files and s.id not in tried]
        if not (ready := [s for s in untried if all(p in files for p in s.priors)]):
            return files  # what is left needs a trial that did not complete: its students fail, naming it
        tried |= {s.id for s in ready}
        train_teachers(ready, teachers_dir, uri, backend, files, say)


def train_teachers(
    specs: list[TrialSpec], teachers_dir: Path, uri: str, backend: Backend, files: dict[str, Path], say
) -> None:
    """Train the unfinished ones of `specs` (whose own teachers are in `files`) under their locks."""

    def unfinished(specs: list[TrialSpec]) -> list[TrialSpec]:
        return [s for s in specs if TrialState.load(teachers_dir / "trials" / s.id).status not in FINISHED_STATES]

    if todo := sorted(unfinished(specs), key=lambda spec: spec.id):
        with contextlib.ExitStack() as locks:
            for spec in todo:  # in id order: two drivers never wait on each other's locks
                (teachers_dir / "trials" / spec.id).mkdir(parents=True, exist_ok=True)
                locks.enter_context(exclusive(teachers_dir / "trials" / spec.id / "lock"))
            if todo := unfinished(todo):  # another driver may have trained some meanwhile
                client = MlflowClient(uri)
                experiment_id = ensure_experiment(client, EXPERIMENT, teachers_dir / "artifacts")
                store = (client, experiment_id, ensure_parent_run(client, experiment_id, EXPERIMENT, {}))
                opened = open_trials(todo, store, EXPERIMENT, teachers_dir, lambda spec: spec.id, say, files)
                trials = [t for t, _ in opened]
                kinds = "stage(s)" if all(s.factors.get("stage") for s in todo) else "teacher(s)"
                say(f"{len(trials)} {kinds} to train first: {', '.join(t.id for t in trials)}")
                backend.run(trials, teachers_dir, EXPERIMENT, progress_of(trials), say)


def progress_of(trials: list[Trial]) -> Progress:
    return Progress(
        {t.id: TrialProgress(t.label, t.config["train"]["steps"], TrialState.load(Path(t.dir)).step) for t in trials}
    )


def prepare_trials(
    study: Study, study_dir: Path, store: tuple[MlflowClient, str, str], teachers: dict[str, Path], say
) -> tuple[list[Trial], int]:
    """One trial directory and child run per grid trial; returns the trials still to run (to train, or finished
    ones to evaluate where the eval config asks for more) and the finished count. An evaluation change never
    trains a trial again: a new metric or step count is evaluated on the final checkpoint, and a changed
    fingerprint (sample count, reference, EMA) keeps the values measured before, which the driver says. A trial
    whose planned teacher did not complete fails at once, with the teacher's reason."""
    todo, finished, remeasured = [], 0, []
    opened = open_trials(study.trials, store, study.name, study_dir, lambda s: study.generation, say, teachers)
    for (trial, state), spec in zip(opened, study.trials):
        missing = [t for t in spec.priors if t not in teachers]
        if missing and state.status not in FINISHED_STATES:
            role = "prior stage" if missing[0] == spec.stage else "teacher"
            finish_unrun(trial, state, f"its {role} {missing[0]} did not complete; see orch status of its trial")
        elif state.status not in FINISHED_STATES or missing_evaluations(spec.config, state):
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
    log_batch(client, parent_id, tags={BEST: json.dumps(best)}, params={"best.trial_id": trial.id})
    log_batch(client, parent_id, metrics=[(f"best/{search.metric}", value, 0)])
    return best


def submit_study(
    study: Study,
    params: BackendParams,
    workdir: Path,
    tracking_uri: str | None,
    report: Report | None = None,
    say=say_plain,
) -> int:
    """Run the study as its one live driver; exit code per docs/contracts.md. `report` writes the study's page at
    the end (the command layer passes the dashboard's builder). Raises StudyBusy, changing nothing, when another
    orch process is running it."""
    study_dir = (workdir / study.name).resolve()
    (study_dir / "trials").mkdir(parents=True, exist_ok=True)
    follow_move(study_dir)  # a copied work directory's store and records are the copy's before anything runs
    previous = claim_study(study_dir, backend=params.name)
    kill_recorded(study_dir)  # what a killed driver started and left running
    if (name := previous.get("backend", "ray" if "ray_temp_dir" in previous else None)) in BACKENDS:
        BACKENDS.get(name).build.recover(previous)  # what else its backend left
    start_records(study_dir)
    try:
        return run_study(study, backend_of(params), study_dir, tracking_uri, report, say)
    finally:
        end_records(study_dir)
        release_study(study_dir)


def run_study(
    study: Study, backend: Backend, study_dir: Path, tracking_uri: str | None, report: Report | None, say
) -> int:
    """Run every unfinished trial of the study (teachers first); write its report."""
    header = f"# study {study.name!r} as last submitted" + (f", profile {study.profile!r}" if study.profile else "")
    atomic_write_bytes(
        study_dir / "study.yaml", f"{header}\n{yaml.safe_dump(study.resolved, sort_keys=False)}".encode()
    )
    uri = tracking_uri or default_tracking_uri(study_dir)
    submission = {"tracking_uri": uri, "study_dir": str(study_dir), "profile": study.profile}
    submission["priors"] = [spec.id for spec in study.teachers]  # for `orch status` while they train
    submission["backend"] = backend.params.model_dump()
    write_json(study_dir / "submission.json", submission | {"generation": study.generation, "submitted": time.time()})
    kind = f"search over {len(study.trials)} grid cell(s)" if study.search else f"{len(study.trials)} trial(s)"
    say(f"study {study.name!r}: {kind}; tracking {uri}")
    client, experiment_id, parent_id = store = prepare_store(study, study_dir, uri)
    started = time.time()
    try:
        with backend.session(study_dir):
            rows, search_errors = run_everything(study, backend, study_dir, uri, store, say)
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
        finish_tracking(study, study_dir, client, experiment_id, parent_id, failed or search_errors, report, say)
    except TRACKING_ERRORS as e:
        say(
            f"error: the tracking store {uri} failed ({store_error(e)}); every result is in "
            f"{study_dir / 'trials'}: `orch resume {study.name}` rebuilds what the store lacks"
        )
        return EXIT_FAILED
    except OSError as e:
        say(f"error: cannot write the dashboard: {e}")
        return EXIT_FAILED
    say(f"MLflow:    {uri}   (browse: orch ui {study.name} --workdir {study_dir.parent})")
    return EXIT_FAILED if failed or search_errors else EXIT_OK


def run_everything(study: Study, backend: Backend, study_dir: Path, uri: str, store, say) -> tuple[list[dict], int]:
    """The teachers and stages, then the trials or the search: (the trials' status rows, the search samples the
    backend could not run)."""
    _, experiment_id, parent_id = store
    teachers = run_teachers(study, study_dir.parent, uri, backend, say)
    if study.search is not None:
        search_errors = backend.search(study, study_dir, uri, experiment_id, parent_id, teachers, say)
        return study_status(study_dir, generation=study.generation), search_errors
    todo, finished = prepare_trials(study, study_dir, store, teachers, say)
    evaluate = sum(TrialState.load(Path(t.dir)).status in FINISHED_STATES for t in todo)
    extra = f" ({evaluate} of them finished, to evaluate at new metrics or step counts)" if evaluate else ""
    say(f"{finished} already finished, {len(todo) - evaluate} to run{extra} on backend {backend.params.name!r}")
    if todo:
        backend.run(todo, study_dir, study.name, progress_of(todo), say)
    return study_status(study_dir, [t.id for t in study.trials]), 0


def last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1]


def finish_tracking(
    study: Study,
    study_dir: Path,
    client: MlflowClient,
    experiment_id: str,
    parent_id: str,
    failed: bool,
    report: Report | None,
    say,
) -> None:
    """Bring MLflow in line with the trial directories, end the parent run, record a search's best sample and
    write the study's report (the dashboard) as the parent run's artifact."""
    reconcile(client, experiment_id, study_dir)
    client.set_terminated(parent_id, status="FAILED" if failed else "FINISHED")
    if study.search is not None and (best := record_best(client, parent_id, study_dir, study.search)):
        say(f"best: {best['label']} ({best['trial_id']}) {best['metric']}={best['value']:.4g}")
    if report is not None:
        dashboard = report(client.tracking_uri, study.name, study_dir / "dashboard.html")
        client.log_artifact(parent_id, str(dashboard))
        say(f"dashboard: {dashboard}")


def settle_interrupted(
    study_dir: Path, backend: Backend, client: MlflowClient, experiment_id: str, parent_id: str, say
) -> None:
    """After Ctrl-C or SIGTERM the trials this process ran stopped with it (a local trial, or Ray's workers shut
    down): they become `cancelled`, continued by `orch resume`, and MLflow says so. Jobs that outlive the driver
    (Slurm's) keep running."""
    if not backend.jobs_outlive_driver:
        mark_cancelled(study_dir, (RUNNING,), "interrupted (Ctrl-C or SIGTERM); `orch resume` continues it")
    try:
        reconcile(client, experiment_id, study_dir)
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


def load_submitted(study_dir: Path) -> tuple[Study, BackendParams, str]:
    """The study, backend and tracking URI of a study's last submission (<study>/study.yaml, submission.json).
    Raises StudyError naming the file when either is unreadable."""
    source = str(study_dir / "study.yaml")
    study = load_study(source)
    submission = read_json(study_dir / "submission.json")
    params, problems = backend_params(submission.get("backend"), "submission.json backend")
    if params is None or "tracking_uri" not in submission:
        why = "; ".join(map(str, problems)) or "no tracking_uri"
        problem = Problem("", f"{study_dir / 'submission.json'} is unreadable ({why}); submit the study file again")
        raise StudyError(source, [problem])
    study.profile = submission.get("profile")
    return study, params, tracking_uri_of(study_dir)


def backend_of_submission(study_dir: Path) -> Backend | None:
    """The backend the study was last submitted to, or None when its record is unreadable."""
    params, _ = backend_params(read_json(study_dir / "submission.json").get("backend") or {})
    return backend_of(params) if params is not None else None


def stop_process(pid: int, wait_seconds: float) -> None:
    """SIGTERM (an orch process stops as on Ctrl-C, keeping its work) and wait up to `wait_seconds` for the end."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + wait_seconds
    while alive(pid) and time.time() < deadline:
        time.sleep(0.2)


def cancel_study(study_dir: Path, say=say_plain, wait_seconds: float = 60.0) -> int:
    """Stop a study's running trials and keep their checkpoints: signal its live driver (Ray or local runs stop
    with it; it stops first, so that it does not end on its own seeing its jobs go) and its `orch eval` processes,
    stop the work its backend
    runs outside the orch process (Slurm jobs), and mark every trial that had not finished `cancelled`. Returns
    how many trials that had not finished are cancelled (a job that completed meanwhile stays completed)."""
    unfinished = [
        d for d in sorted((study_dir / "trials").iterdir()) if TrialState.load(d).status in (PENDING, RUNNING)
    ]
    if pid := live_driver(recorded_driver(study_dir)):
        stop_process(pid, wait_seconds)
        say(f"stopped the orch process {pid} running the study")
    for pid in live_evaluators(study_dir):
        stop_process(pid, wait_seconds)
        say(
            f"stopped the `orch eval` process {pid} (its finished evaluations are kept; the same command does the rest)"
        )
    if (backend := backend_of_submission(study_dir)) is not None:
        backend.cancel(unfinished, say)
    mark_cancelled(study_dir, (PENDING, RUNNING), "cancelled by `orch cancel`; `orch resume` continues it")
    cancelled = sum(TrialState.load(d).status == CANCELLED for d in unfinished)
    client = MlflowClient(tracking_uri_of(study_dir))
    experiment = client.get_experiment_by_name(study_dir.name)
    if experiment is not None:
        reconcile(client, experiment.experiment_id, study_dir)
    return cancelled
