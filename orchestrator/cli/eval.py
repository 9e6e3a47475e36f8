"""`orch eval`: its options and its handler (the evaluation itself: orchestrator/eval.py)."""

from __future__ import annotations

import functools
import signal
import sys
from pathlib import Path

from orch.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_OK,
    add_submitted_command,
    eval_request,
    parse_overrides,
    raise_interrupt,
    refuse_options,
    study_dir_of,
)


def where_of(pairs: list[str]) -> dict:
    """--where KEY=VALUE pairs as {dotted key: YAML value}; exits 2 on a malformed one."""
    from orch.problems import StudyError

    try:
        return parse_overrides(pairs)
    except StudyError as e:
        print(e.report().replace("an override is", "--where is"), file=sys.stderr)
        raise SystemExit(EXIT_INVALID) from None


def eval_backend(study_dir: Path, name: str):
    """(backend, problems) for `orch eval --backend NAME`: the study's own backend options when it was submitted to
    that backend, else the backend's defaults."""
    from orch.backends.catalog import backend_of, backend_params
    from orch.driver import backend_of_submission

    submitted = backend_of_submission(study_dir)
    if submitted is not None and submitted.params.name == name:
        backend = submitted
    else:
        params, problems = backend_params({"name": name}, "--backend")
        if problems:
            return None, problems
        backend = backend_of(params)
    return backend, backend.preflight(from_cli=False)


def cmd_eval(args) -> int:
    from orch.backends.base import BackendError
    from orch.eval import evaluate_dir, request_problems, select_trials
    from orch.execution.build import inception_problems
    from orch.lock import evaluating

    study_dir = study_dir_of(args.study, args.workdir)
    request, where = eval_request(args), where_of(args.where)
    if problems := request_problems(study_dir, request, args.trials, where):
        return refuse_options("eval", problems)
    trials, notes = select_trials(study_dir, args.trials, where)
    metrics = set(request.metrics or [m for t in trials for m in t.config["eval"]["metrics"]])
    if problems := inception_problems(metrics, "--metrics"):
        return refuse_options("eval", problems)
    for note in notes:
        print(f"note: {note}")
    if not trials:
        print("error: no trial matches: nothing to evaluate", file=sys.stderr)
        return EXIT_INVALID
    backend, problems = eval_backend(study_dir, args.backend)
    if problems:
        return refuse_options("eval", problems)
    signal.signal(signal.SIGTERM, raise_interrupt)
    here = backend.params.name == "local"  # in this process: its lines are printed as they come
    task = functools.partial(evaluate_dir, request=request, say=print if here else None)
    try:
        with evaluating(study_dir):  # `orch cancel` finds and stops it
            results = backend.map(task, [t.dir for t in trials], study_dir, study_dir.name)
    except KeyboardInterrupt:
        print("interrupted: finished evaluations are kept; the same command finishes the rest", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BackendError as e:  # e.g. a Slurm job that died without a result: done evaluations are kept
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    for _, _, lines in results if not here else []:
        print("\n".join(lines))
    computed, lacking = sum(r[0] for r in results), sum(r[1] for r in results)
    done_before = "" if computed else " (every evaluation was done already)"
    print(f"{computed} evaluation(s) computed for {len(trials)} trial(s){done_before}; logged as final/<metric>/…")
    return EXIT_FAILED if lacking else EXIT_OK  # some evaluation lacked weights or failed


def add_eval(sub) -> None:
    help_text = "evaluate stored checkpoints after training: final/<metric>/… in each trial's run"
    s = add_submitted_command(sub, "eval", help_text, cmd_eval)
    s.add_argument("--trials", nargs="+", metavar="ID", help="these trials only (default: every completed one)")
    s.add_argument("--where", nargs="+", default=[], metavar="KEY=VALUE", help="trials whose config has these values")
    s.add_argument("--checkpoint", default="best", help="best (per NFE, default), last, or a kept training step")
    s.add_argument("--nfe", help="step counts, e.g. 1,2,4 (default: each trial's eval.nfe)")
    s.add_argument("--num", type=int, help="samples per evaluation, e.g. 50000 (default: eval.num_samples)")
    s.add_argument("--metrics", help="e.g. fid,kid,is,prc (prc = precision and recall; default: eval.metrics)")
    s.add_argument("--guidance", help="guidance scales, e.g. 1,1.5 (default: eval.guidance)")
    s.add_argument("--seeds", type=int, default=1, help="seed ranges, each its own noise and labels (default 1)")
    s.add_argument("--device", help="cpu or cuda (default: each trial's train.device)")
    s.add_argument(
        "--backend",
        default="local",
        help="local: in this process (default); ray or slurm: one task or job per trial, with the study's "
        "backend options when it was submitted there",
    )
