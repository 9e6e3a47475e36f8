"""The commands that show a study's results: dashboard, table, ui."""

from __future__ import annotations

import sys
from pathlib import Path

from orch.cli.common import (
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    WORKDIR_HELP,
    add_submitted_command,
    default_workdir,
    study_dir_of,
)


def cmd_dashboard(args) -> int:
    from orch.dashboards.report import build_dashboard
    from orch.driver import tracking_uri_of

    study_dir = study_dir_of(args.study, args.workdir)
    uri = args.tracking_uri or tracking_uri_of(study_dir)
    if args.serve:
        from orch.cli.serve import serve_dashboard

        return serve_dashboard(uri, study_dir, args.port, args.interval)
    try:
        print(build_dashboard(uri, study_dir.name, study_dir / "dashboard.html"))
    except LookupError as e:  # no such experiment in that store
        print(f"error: {e.args[0]}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as e:
        print(f"error: cannot write the dashboard: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def add_dashboard(sub) -> None:
    help_text = "(re)build <workdir>/<study>/dashboard.html, or serve it live"
    s = add_submitted_command(sub, "dashboard", help_text, cmd_dashboard)
    s.add_argument("--tracking-uri", help="read another MLflow store (default: the study's own)")
    s.add_argument("--serve", action="store_true", help="serve on 127.0.0.1, rebuilt while trials run")
    s.add_argument("--port", type=int, help="port for --serve (default: a free one)")
    s.add_argument("--interval", type=int, default=30, help="seconds between rebuilds with --serve (default 30)")


def cmd_table(args) -> int:
    from orch.dashboards.report import direction_of, study_frames, study_groups
    from orch.dashboards.tables import final_values, paper_table, render
    from orch.driver import tracking_uri_of
    from orch.tracking.schema import parse_eval_key

    study_dir = study_dir_of(args.study, args.workdir)
    if args.digits < 0 or args.digits > 12:
        print("error: orch table: --digits: 0 to 12 decimals", file=sys.stderr)
        return EXIT_INVALID
    try:
        runs, _, parent_tags, _ = study_frames(args.tracking_uri or tracking_uri_of(study_dir), study_dir.name)
    except LookupError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return EXIT_INVALID
    group_cols, _ = study_groups(runs, parent_tags)
    keys = [parse_eval_key(c) for c in runs.columns]
    metrics = sorted({k.metric for k in keys if k is not None and k.source == args.source})
    metric = args.metric or (metrics[0] if metrics else None)
    if metric not in metrics:
        found = ", ".join(metrics) or "none"
        print(
            f"error: no {args.source}/ values of {metric!r} in study {study_dir.name} (metrics: {found})",
            file=sys.stderr,
        )
        return EXIT_INVALID
    if args.source == "final":  # only the values measured under one protocol, and the others said
        runs, _, notes = final_values(runs, metric)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    table = paper_table(runs, metric, group_cols, direction_of(runs, metric), args.source, args.guidance, args.spread)
    if table.empty:
        print(f"error: no completed trial has {args.source}/{metric} values at ω = {args.guidance:g}", file=sys.stderr)
        return EXIT_INVALID
    print(render(table, metric, args.format, args.digits), end="")
    return EXIT_OK


def add_table(sub) -> None:
    s = add_submitted_command(sub, "table", "the ranking table for a paper: Markdown, LaTeX or CSV", cmd_table)
    s.add_argument("--metric", help="which metric (default: the first alphabetically)")
    s.add_argument("--source", choices=["eval", "final"], default="eval", help="in-training (default) or orch eval's")
    s.add_argument("--format", choices=["markdown", "latex", "csv"], default="markdown")
    s.add_argument(
        "--spread",
        choices=["half-range", "std", "ci95"],
        default="half-range",
        help="± over seeds (default half the range)",
    )
    s.add_argument("--guidance", type=float, default=1.0, help="the guidance scale shown (default 1)")
    s.add_argument("--digits", type=int, default=3, help="decimals of the metric (default 3)")
    s.add_argument("--tracking-uri", help="read another MLflow store (default: the study's own)")


def cmd_ui(args) -> int:
    from orch.cli.serve import serve_mlflow_ui
    from orch.driver import tracking_uri_of

    if args.study is None:
        studies = sorted(p.parent.name for p in Path(args.workdir).glob("*/trials"))
        if len(studies) != 1:
            found = ", ".join(studies) or "none"
            print(f"error: name the study to browse (studies under {args.workdir}/: {found})", file=sys.stderr)
            return EXIT_INVALID
        args.study = studies[0]
    study_dir = study_dir_of(args.study, args.workdir)
    return serve_mlflow_ui(tracking_uri_of(study_dir), study_dir, args.port, args.read_only)


def add_ui(sub) -> None:
    s = sub.add_parser("ui", help="the MLflow UI over a study's store, on 127.0.0.1")
    s.add_argument("study", nargs="?", help="study name (optional when the workdir holds one study)")
    s.add_argument("--workdir", default=default_workdir(), help=WORKDIR_HELP)
    s.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    s.add_argument("--read-only", action="store_true", help="print the login of a user who may only read (to share)")
    s.set_defaults(func=cmd_ui)
