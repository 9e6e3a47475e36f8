"""The commands on a study: validate, plan, submit, status, resume, cancel, prune."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from orch.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_OK,
    WORKDIR_HELP,
    add_study_command,
    add_submitted_command,
    default_workdir,
    load_or_exit,
    raise_interrupt,
    refuse,
    store_failure,
    study_dir_of,
)
from orch.preflight import tracking_problems, workdir_problems
from orch.problems import Problem


def cmd_validate(args) -> int:
    study = load_or_exit(args)
    print(
        f"{args.study}: valid study {study.name!r}, {len(study.trials)} trial(s)"
        + (f" with profile {study.profile!r}" if study.profile else "")
    )
    return EXIT_OK


def add_validate(sub) -> None:
    add_study_command(sub, "validate", "check a study file; exit 2 listing every problem", cmd_validate)


def print_plan(study) -> None:
    from orch.trial.spec import show_factor

    print(
        f"study {study.name!r}"
        + (f" (profile {study.profile})" if study.profile else "")
        + f": {len(study.trials)} trial(s)"
    )
    axes = study.axes
    rows = [[show_factor(t.factors.get(a)) for a in axes] for t in study.trials]
    widths = [max(len(a), *(len(row[i]) for row in rows)) for i, a in enumerate(axes)]
    print("  " + "trial_id".ljust(14) + "  ".join(a.ljust(w) for a, w in zip(axes, widths)))
    for t, row in zip(study.trials, rows):
        print("  " + t.id.ljust(14) + "  ".join(v.ljust(w) for v, w in zip(row, widths)))
    if study.teachers:
        staged = any("stage" in prior.factors for prior in study.teachers)
        kinds = "teacher and prior-stage trial(s)" if staged else "teacher trial(s)"
        print(f"{len(study.teachers)} {kinds}, trained first (once per work directory):")
        everyone = [*study.teachers, *study.trials]
        for prior in study.teachers:
            method = prior.config["method"]["name"]
            students = sum(t.teacher == prior.id for t in everyone)
            guided = sum(t.guide == prior.id for t in everyone)
            started = sum(t.stage == prior.id for t in everyone)
            if started:
                role = f"the prior stage of {started} trial(s), after {', '.join(prior.priors) or 'nothing'}"
            elif students:
                role = f"for {students} trial(s)"
            else:
                role = f"the weak teacher that autoguides {guided} trial(s)"
            kind = "flow matching" if method == "fm" else method
            print(f"  {prior.id.ljust(14)}{kind}, {prior.config['train']['steps']} steps, {role}")


def print_job_scripts(study, workdir: Path) -> None:
    """The scripts the study's backend would submit (Slurm: its sbatch scripts), with the teachers first."""
    from orch.backends.catalog import backend_of

    backend = backend_of(study.backend)
    study_dir = workdir.resolve() / study.name
    for trials, kind in ((study.teachers, "teacher and prior-stage trials"), (study.trials, "trials")):
        for script in backend.job_scripts([t.config for t in trials], study_dir, study.name):
            print(f"\n# the {study.backend.name} job script of the {kind} (for --workdir {workdir})\n{script}")


def cmd_plan(args) -> int:
    study = load_or_exit(args)
    print_plan(study)
    print_job_scripts(study, Path(args.workdir))
    return EXIT_OK


def add_plan(sub) -> None:
    s = add_study_command(sub, "plan", "print the expanded trials and the jobs they make; nothing runs", cmd_plan)
    s.add_argument("--workdir", default=default_workdir(), help=WORKDIR_HELP)


RAY_OPTIONS = {"ray_address": "address", "max_concurrent": "max_concurrent"}
"""submit's options that set the ray backend's options (option attribute → backend key)."""


def given_options(args) -> list[str]:
    return [option for option in RAY_OPTIONS if getattr(args, option) is not None]


def submitted_backend(study, args):
    """The backend options of a submission: the study's (--backend and --cluster applied when it was loaded),
    with --ray-address / --max-concurrent on top. Returns (params, problems)."""
    from orch.backends.catalog import backend_params

    raw = study.backend.model_dump()
    given = {RAY_OPTIONS[option]: getattr(args, option) for option in given_options(args)}
    if given and raw["name"] != "ray":
        flags = ", ".join("--" + option.replace("_", "-") for option in given_options(args))
        return None, [Problem(flags, f"applies to the ray backend; this submission's backend is {raw['name']!r}")]
    return backend_params(raw | given)


def cmd_submit(args) -> int:
    from orch.backends.catalog import backend_of
    from orch.study.versions import changed_plan

    study = load_or_exit(args)
    params, problems = submitted_backend(study, args)
    if problems:
        return refuse(args.study, problems)
    workdir = Path(args.workdir)
    problems = workdir_problems(workdir) + tracking_problems(args.tracking_uri)
    problems += backend_of(params).preflight(from_cli=args.ray_address is not None)
    if problems:
        return refuse(args.study, problems)
    if problems := input_file_problems(study):
        return refuse(study.name, problems)
    if not args.new_version and (change := changed_plan(workdir / study.name, study)):
        message = (
            f"study {study.name!r} in {workdir} was last submitted with other trials ({change}); --new-version "
            "runs this version next to the earlier one (`orch status --all` lists both, `orch prune` archives "
            "the earlier trials), or give this study another name"
        )
        return refuse(args.study, [Problem("--new-version", message)])
    if args.dry_run:
        print_plan(study)
        print_job_scripts(study, workdir)
        print(f"(dry run: every check a submission makes passed; backend {params.name}; nothing started or created)")
        return EXIT_OK
    return run_submission(study, params, workdir, args.tracking_uri)


def input_file_problems(study) -> list[Problem]:
    """The files the study's trials read (datasets, latents, checkpoints, teachers, reference statistics) must
    be there and be what they claim, before anything is created."""
    from orch.execution.build import check_data
    from orch.execution.teachers import named_file_problems

    configs = [t.config for t in study.trials]
    problems = check_data(configs)
    for config in {repr([c["dataset"], c["model"], c["method"]]): c for c in configs}.values():
        problems += [p for p in named_file_problems(config) if p not in problems]
    return problems


def run_submission(study, params, workdir: Path, tracking_uri: str | None) -> int:
    """Submit with the CLI's signal handling and exit codes (shared by submit and resume)."""
    from orch.dashboards.report import build_dashboard
    from orch.driver import submit_study
    from orch.lock import StudyBusy
    from orch.tracking.store import TRACKING_ERRORS

    signal.signal(signal.SIGTERM, raise_interrupt)  # SIGTERM (what Slurm and `orch cancel` send) as Ctrl-C
    try:
        return submit_study(study, params, workdir, tracking_uri, report=build_dashboard)
    except StudyBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except TRACKING_ERRORS as e:  # the store failed before any trial ran (or while recording the end)
        print(store_failure(e, study.name), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(
            f"interrupted: finished trials are kept; `orch resume {study.name}` (or submitting the study again)"
            " continues the rest from their checkpoints",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def add_submit(sub) -> None:
    s = add_study_command(sub, "submit", "run every trial of a study (finished trials are skipped)", cmd_submit)
    s.add_argument("--workdir", default=default_workdir(), help=WORKDIR_HELP)
    s.add_argument("--ray-address", help="an existing Ray cluster, HOST:PORT or ray://HOST:PORT (default: embedded)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<workdir>/<study>/mlflow.db)")
    s.add_argument("--max-concurrent", type=int, help="trials at once on Ray (default: the study's backend)")
    s.add_argument(
        "--new-version",
        action="store_true",
        help="run this study although it plans other trials than the one last submitted under its name",
    )
    dry_run = "make every check a submission makes and print the plan; nothing is created"
    s.add_argument("--dry-run", action="store_true", help=dry_run)


def job_states(backend, rows: list[dict]) -> dict[str, str]:
    """Live states of the rows' jobs from the study's backend, or {} with a warning when it cannot be asked."""
    from orch.backends.base import BackendError

    ids = [row["job_id"] for row in rows if row["job_id"]]
    if backend is None or not ids:
        return {}
    try:
        return backend.job_states(ids)
    except BackendError as e:
        print(f"warning: no {backend.params.name} job states: {e}", file=sys.stderr)
        return {}


def cmd_status(args) -> int:
    from orch.driver import backend_of_submission, study_status
    from orch.lock import live_driver, recorded_driver
    from orch.trial.state import read_json
    from orch.trial.status import RUNNING

    study_dir = study_dir_of(args.study, args.workdir)
    submission = read_json(study_dir / "submission.json")
    current = submission.get("generation")
    teachers_dir = study_dir.parent / "teachers"
    if priors := [i for i in submission.get("priors", []) if (teachers_dir / "trials" / i).is_dir()]:
        print("teachers and prior stages (trained first, shared by the work directory):")
        for row in study_status(teachers_dir, priors):
            print(f"  {row['id']}  {row['status']:<10} step {row['step']:>7}  {row['label']}")
    rows = study_status(study_dir)
    shown = [r for r in rows if args.all or current is None or r["generation"] in (current, "")]  # "": unknown
    backend = backend_of_submission(study_dir)
    states = job_states(backend, shown)
    driven = live_driver(recorded_driver(study_dir)) is not None
    for row in shown:
        job_id = row["job_id"] if backend is not None else None
        live = job_id is not None and states.get(job_id) in backend.live_job_states
        job = f"  [{backend.params.name} {job_id} {states.get(job_id, 'gone')}]" if job_id else ""
        note = row["reason"].strip().splitlines()[-1] if row["reason"] else ""
        if row["status"] == RUNNING and not driven and not live:
            note = "no live orch process runs it: `orch resume` continues it from its checkpoint"
        older = "  [earlier version of the study]" if row["generation"] not in (current, "") else ""
        print(
            f"{row['id']}  {row['status']:<10} step {row['step']:>7}  {row['label']}{job}{older}"
            + (f"  ({note})" if note else "")
        )
    counts = {}
    for row in shown:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials" + (" yet" if priors else ""))
    if hidden := len(rows) - len(shown):
        print(
            f"{hidden} trial(s) of earlier versions of the study not shown: `orch status {study_dir.name} --all` lists "
            f"them, `orch prune {study_dir.name}` archives them"
        )
    return EXIT_OK


def add_status(sub) -> None:
    s = add_submitted_command(sub, "status", "per-trial state of a submitted study", cmd_status)
    s.add_argument("--all", action="store_true", help="also the trials of earlier versions of the study file")


def cmd_resume(args) -> int:
    from orch.backends.catalog import backend_of
    from orch.driver import load_submitted
    from orch.problems import StudyError

    study_dir = study_dir_of(args.study, args.workdir)
    try:
        study, params, uri = load_submitted(study_dir)
    except StudyError as e:
        print(e.report(), file=sys.stderr)
        return EXIT_INVALID
    if problems := tracking_problems(uri) + backend_of(params).preflight(from_cli=False):
        return refuse(str(study_dir / "study.yaml"), problems)
    if problems := input_file_problems(study):
        return refuse(study.name, problems)
    profile = f"profile {study.profile}" if study.profile else "the default profile"
    print(f"resuming study {study.name!r} as last submitted (backend {params.name}, {profile})")
    return run_submission(study, params, study_dir.parent, uri)


def add_resume(sub) -> None:
    help_text = "finish an interrupted study as last submitted; finished trials are kept"
    add_submitted_command(sub, "resume", help_text, cmd_resume)


def cmd_cancel(args) -> int:
    from orch.driver import cancel_study

    study_dir = study_dir_of(args.study, args.workdir)
    n = cancel_study(study_dir)
    print(f"{n} trial(s) cancelled; checkpoints kept (`orch resume {study_dir.name}` continues them)")
    return EXIT_OK


def add_cancel(sub) -> None:
    help_text = "stop a study's running trials and evaluations (its orch processes, its Slurm jobs)"
    add_submitted_command(sub, "cancel", help_text, cmd_cancel)


def cmd_prune(args) -> int:
    from orch.driver import prune_study
    from orch.lock import StudyBusy

    study_dir = study_dir_of(args.study, args.workdir)
    try:
        archived = prune_study(study_dir, args.dry_run)
    except StudyBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    verb = "would archive" if args.dry_run else "archived"
    print(
        f"{verb} {len(archived)} trial(s) of earlier versions of the study"
        + (f" into {study_dir / 'archive'}" if archived and not args.dry_run else "")
    )
    for trial_id in archived:
        print(f"  {trial_id}")
    return EXIT_OK


def add_prune(sub) -> None:
    s = add_submitted_command(sub, "prune", "archive the trials of earlier versions of the study file", cmd_prune)
    s.add_argument("--dry-run", action="store_true", help="list what would be archived; change nothing")
