"""`orch`: validate, plan, submit, status and dashboard for study files (DESIGN.md's CLI contract)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import yaml

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


def load_or_exit(path: str, profile: str | None):
    from orchestrator.study import StudyError, load_study

    try:
        return load_study(path, profile)
    except StudyError as e:
        print(e.report(), file=sys.stderr)
        raise SystemExit(EXIT_INVALID) from None


def cmd_validate(args) -> int:
    study = load_or_exit(args.study, args.profile)
    print(
        f"{args.study}: valid study {study.name!r}, {len(study.trials)} trial(s)"
        + (f" with profile {study.profile!r}" if study.profile else "")
    )
    return EXIT_OK


def print_plan(study) -> None:
    print(
        f"study {study.name!r}"
        + (f" (profile {study.profile})" if study.profile else "")
        + f": {len(study.trials)} trial(s)"
    )
    axes = study.axes
    widths = [max(len(a), *(len(str(t.factors.get(a))) for t in study.trials)) for a in axes]
    print("  " + "trial_id".ljust(14) + "  ".join(a.ljust(w) for a, w in zip(axes, widths)))
    for t in study.trials:
        print("  " + t.id.ljust(14) + "  ".join(str(t.factors.get(a)).ljust(w) for a, w in zip(axes, widths)))


def cmd_plan(args) -> int:
    print_plan(load_or_exit(args.study, args.profile))
    return EXIT_OK


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_submit(args) -> int:
    study = load_or_exit(args.study, args.profile)
    backend = study.backend.model_copy(
        update={
            k: v
            for k, v in {
                "name": args.backend,
                "max_concurrent": args.max_concurrent,
                "address": args.ray_address,
            }.items()
            if v is not None
        }
    )
    if args.dry_run:
        print_plan(study)
        print(f"(dry run: backend {backend.name}, nothing started)")
        return EXIT_OK

    from orchestrator.driver import submit_study

    signal.signal(signal.SIGTERM, raise_interrupt)  # Tune handles SIGINT but not SIGTERM (what Slurm sends)
    try:
        return submit_study(study, backend, Path(args.workdir), args.tracking_uri)
    except KeyboardInterrupt:
        print(
            "interrupted: finished trials are kept; `orch submit` the same study again to resume the rest",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def study_dir_of(target: str, workdir: str) -> Path:
    """A study given by its file (its `name`) or by name."""
    name = target
    if target.endswith((".yaml", ".yml")) and Path(target).exists():
        name = yaml.safe_load(Path(target).read_text()).get("name", target)
    path = Path(workdir) / name
    if not (path / "trials").is_dir():
        print(f"error: no submitted study {name!r} under {workdir}/", file=sys.stderr)
        raise SystemExit(EXIT_INVALID)
    return path


def cmd_status(args) -> int:
    from orchestrator.driver import study_status

    rows = study_status(study_dir_of(args.study, args.workdir))
    for row in rows:
        print(
            f"{row['id']}  {row['status']:<10} step {row['step']:>7}  {row['label']}"
            + (f"  ({row['reason'].strip().splitlines()[-1]})" if row["reason"] else "")
        )
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return EXIT_OK


def cmd_dashboard(args) -> int:
    from dashboards.report import build_dashboard
    from orchestrator.driver import tracking_uri_of

    study_dir = study_dir_of(args.study, args.workdir)
    uri = args.tracking_uri or tracking_uri_of(study_dir)
    print(build_dashboard(uri, study_dir.name, study_dir / "dashboard.html"))
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orch", description="Run and compare few-step generative-model studies.")
    sub = p.add_subparsers(dest="command", required=True)

    def study_cmd(name: str, help_text: str):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("study", help="study YAML file")
        s.add_argument("--profile", help="named override set from the study's `profiles`")
        return s

    study_cmd("validate", "check a study file; exit 2 listing every problem").set_defaults(func=cmd_validate)
    study_cmd("plan", "print the expanded trials; nothing runs").set_defaults(func=cmd_plan)
    s = study_cmd("submit", "run every trial of a study (completed trials are skipped)")
    s.add_argument("--backend", choices=["ray", "local"])
    s.add_argument("--workdir", default="runs", help="where studies live (default: runs)")
    s.add_argument("--ray-address", help="existing Ray cluster (default: start an embedded local Ray)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<workdir>/<study>/mlflow.db)")
    s.add_argument("--max-concurrent", type=int, help="trials at once on Ray")
    s.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    s.set_defaults(func=cmd_submit)
    for name, func, help_text in [
        ("status", cmd_status, "per-trial state of a submitted study"),
        ("dashboard", cmd_dashboard, "(re)build <workdir>/<study>/dashboard.html"),
    ]:
        s = sub.add_parser(name, help=help_text)
        s.add_argument("study", help="study name or study YAML file")
        s.add_argument("--workdir", default="runs")
        if name == "dashboard":
            s.add_argument("--tracking-uri")
        s.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
