"""The driver of `orch submit`: study directory, MLflow store and runs, then the backend, then the summary."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from orchestrator.backends import run_local, run_ray, say_plain
from orchestrator.progress import Progress, TrialProgress
from orchestrator.runner import Trial
from orchestrator.state import FAILED, FINISHED_STATES, TrialState, write_json
from orchestrator.study import Backend, Study
from orchestrator.tracking import (
    default_tracking_uri,
    ensure_experiment,
    ensure_parent_run,
    ensure_trial_run,
    environment_tags,
)

EXIT_OK, EXIT_FAILED = 0, 1


def tracking_uri_of(study_dir: Path) -> str:
    """The tracking URI the study was last submitted with."""
    submission = study_dir / "submission.json"
    if submission.exists():
        return json.loads(submission.read_text())["tracking_uri"]
    return default_tracking_uri(study_dir)


def study_status(study_dir: Path, ids: list[str] | None = None) -> list[dict]:
    """Per-trial state from the trial directories (the source of truth), in plan order when ids are given."""
    trial_dirs = [study_dir / "trials" / i for i in ids] if ids else sorted((study_dir / "trials").iterdir())
    rows = []
    for trial_dir in trial_dirs:
        state = TrialState.load(trial_dir)
        label = Trial.load(trial_dir).label if (trial_dir / "trial.json").exists() else ""
        rows.append(
            {"id": trial_dir.name, "label": label, "status": state.status, "step": state.step, "reason": state.reason}
        )
    return rows


def prepare_trials(study: Study, study_dir: Path, uri: str) -> tuple[list[Trial], int, MlflowClient, str]:
    """Create the store, experiment, parent run and one child run per trial before any trial starts (a fresh
    sqlite store must not be created by several processes at once). Returns the trials still to run."""
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, study.name, study_dir / "artifacts")
    tags = environment_tags() | {
        "orch.axes": json.dumps(study.axes),
        "orch.grid": json.dumps(study.resolved["grid"])[:5000],
        "orch.study_yaml": (study_dir / "study.yaml").read_text()[:5000],
        "orch.profile": study.profile or "default",
        "orch.description": study.description[:4000],
    }
    parent_id = ensure_parent_run(client, experiment_id, study.name, tags)
    client.log_artifact(parent_id, str(study_dir / "study.yaml"))
    todo, finished = [], 0
    for spec in study.trials:
        trial_dir = study_dir / "trials" / spec.id
        trial_dir.mkdir(parents=True, exist_ok=True)
        state = TrialState.load(trial_dir)
        run_id = ensure_trial_run(client, experiment_id, parent_id, spec.id, spec.label, spec.config, state.run_id)
        if state.run_id != run_id:
            state.run_id = run_id
            state.save(trial_dir)
        trial = Trial(spec.id, study.name, spec.label, spec.config, spec.factors, str(trial_dir), uri, run_id)
        trial.save()
        if state.status in FINISHED_STATES:
            finished += 1
        else:
            todo.append(trial)
    return todo, finished, client, parent_id


def submit_study(study: Study, backend: Backend, workdir: Path, tracking_uri: str | None, say=say_plain) -> int:
    """Run every unfinished trial of the study; write the dashboard; exit code per DESIGN.md."""
    study_dir = (workdir / study.name).resolve()
    (study_dir / "trials").mkdir(parents=True, exist_ok=True)
    (study_dir / "study.yaml").write_text(yaml.safe_dump({**study.resolved, "profile": study.profile}, sort_keys=False))
    uri = tracking_uri or default_tracking_uri(study_dir)
    write_json(
        study_dir / "submission.json",
        {"tracking_uri": uri, "profile": study.profile, "backend": backend.model_dump(), "submitted": time.time()},
    )
    say(f"study {study.name!r}: {len(study.trials)} trial(s); tracking {uri}")
    todo, finished, client, parent_id = prepare_trials(study, study_dir, uri)
    say(f"{finished} already finished, {len(todo)} to run on backend {backend.name!r}")
    started = time.time()
    progress = Progress(
        {t.id: TrialProgress(t.label, t.config["train"]["steps"], TrialState.load(Path(t.dir)).step) for t in todo}
    )
    if todo and backend.name == "local":
        run_local(todo, progress)
    elif todo:
        run_ray(todo, study_dir, backend.resources.model_dump(), backend.max_concurrent, backend.address, progress)
    rows = study_status(study_dir, [t.id for t in study.trials])
    failed = [r for r in rows if r["status"] not in FINISHED_STATES]
    client.set_terminated(parent_id, status="FAILED" if failed else "FINISHED")

    from dashboards.report import build_dashboard

    dashboard = build_dashboard(uri, study.name, study_dir / "dashboard.html")
    client.log_artifact(parent_id, str(dashboard))
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    say(f"done in {time.time() - started:.0f} s: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for r in failed:
        say(
            f"  {r['id']} {r['label']}: {r['status']}"
            + (f" — {r['reason'].strip().splitlines()[-1]}" if r["reason"] else "")
        )
    say(f"dashboard: {dashboard}")
    say(f"MLflow:    {uri}   (browse: orch ui {study.name} --workdir {workdir})")
    return EXIT_FAILED if any(r["status"] == FAILED for r in rows) or failed else EXIT_OK
