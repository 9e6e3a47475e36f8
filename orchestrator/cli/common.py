"""What the commands share: exit codes, reading a study or a submitted one, overrides, refusals, the work
directory."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import yaml

from orch.problems import Problem

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


WORKDIR_ENV = "ORCH_WORKDIR"


WORKDIR_HELP = f"where studies live (default: ${WORKDIR_ENV}, else ./runs)"


def default_workdir() -> str:
    return os.environ.get(WORKDIR_ENV) or "runs"


def load_or_exit(args):
    """The study of a command's STUDY, --profile, KEY=VALUE overrides, --backend and --cluster, or exit 2 listing
    every problem."""
    from orch.problems import StudyError
    from orch.study.clusters import ClusterError, load_cluster
    from orch.study.load import load_study

    try:
        Path(args.study).open("rb").close()
    except OSError as e:
        print(f"error: cannot read the study file {args.study}: {e.strerror}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID) from None
    try:
        cluster = load_cluster(args.cluster) if args.cluster else None
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID) from None
    try:
        return load_study(args.study, args.profile, parse_overrides(args.overrides), args.backend, cluster)
    except StudyError as e:
        print(e.report(), file=sys.stderr)
        raise SystemExit(EXIT_INVALID) from None


WHOLE_IN_E_NOTATION = r"[-+]?[0-9]+[eE]\+?[0-9]{1,3}"
"""1e3, 5E+4: a count written as a power of ten (YAML reads it as a float); an option that is a float takes it too."""


def parse_overrides(pairs: list[str]) -> dict:
    """KEY=VALUE arguments as dotted key → value, each value read as YAML (`lr=1e-3`, `'method.name=[lsd,esd]'`).
    Raises StudyError naming a malformed one."""
    from orch.problems import StudyError
    from orch.study.yaml_source import YAMLLimit, check_limits, parse

    overrides, problems = {}, []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
            problems.append(Problem(pair, "an override is KEY=VALUE with a dotted KEY, e.g. train.lr=1e-3"))
            continue
        try:
            check_limits(text)
            overrides[key] = int(float(text)) if re.fullmatch(WHOLE_IN_E_NOTATION, text) else parse(text)
        except (YAMLLimit, yaml.YAMLError) as e:
            problems.append(Problem(pair, f"the value is not YAML ({type(e).__name__})"))
    if problems:
        raise StudyError("the command line", problems)
    return overrides


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def refuse(source: str, problems: list) -> int:
    """Report problems found before anything was created: exit 2."""
    from orch.problems import StudyError

    print(StudyError(source, problems).report(), file=sys.stderr)
    return EXIT_INVALID


def study_dir_of(target: str, workdir: str) -> Path:
    """A submitted study given by its file (its `name`) or by name; a name obeys the study files' rule, so that
    it never leaves the work directory."""
    from orch.driver import follow_move, moved_with_its_store
    from orch.problems import StudyError, did_you_mean
    from orch.study.load import load_study
    from orch.study.schema import STUDY_NAME

    name = target
    if target.endswith((".yaml", ".yml")) and Path(target).is_file():
        try:
            name = load_study(target).name
        except StudyError as e:
            print(e.report(), file=sys.stderr)
            raise SystemExit(EXIT_INVALID) from None
    if not re.fullmatch(STUDY_NAME, name):
        print(f"error: {name!r} is not a study name (letters, digits, _ . -; no paths)", file=sys.stderr)
        raise SystemExit(EXIT_INVALID)
    path = Path(workdir) / name
    if not (path / "trials").is_dir():
        where = f"{Path(workdir).resolve()}/" + (
            f" (${WORKDIR_ENV})" if os.environ.get(WORKDIR_ENV) == workdir else " (--workdir; default ./runs)"
        )
        known = sorted(p.parent.name for p in Path(workdir).glob("*/trials") if p.is_dir())
        print(f"error: no submitted study {name!r} under {where}{did_you_mean(name, known)}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID)
    if why := moved_with_its_store(path):
        print(f"error: {why}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID)
    follow_move(path)
    return path


def comma_list(text: str, kind: type, option: str) -> list:
    """`1,2,4` → [1, 2, 4]; exits 2 naming the option when an item is not a `kind`."""
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        print(f"error: {option} {text!r}: a comma-separated list of {kind.__name__} values", file=sys.stderr)
        raise SystemExit(EXIT_INVALID) from None


OPTION_OF = {
    "eval.metrics": "--metrics",
    "eval.nfe": "--nfe",
    "eval.num_samples": "--num",
    "eval.guidance": "--guidance",
}
"""Where a post-hoc command's option lands in a trial's eval section."""


def refuse_options(command: str, problems: list) -> int:
    """Report problems with a post-hoc command's options, one line each, under the option's name: exit 2."""
    for p in problems:
        option = next((o for key, o in OPTION_OF.items() if p.path == key or p.path.startswith(key + ".")), p.path)
        print(f"error: orch {command}: {option}: {p.message}", file=sys.stderr)
    return EXIT_INVALID


def eval_request(args):
    from orch.eval import Request

    metrics = None
    if args.metrics is not None:  # prc = precision and recall, as torch-fidelity names the pair
        names = comma_list(args.metrics, str, "--metrics")
        metrics = [m for name in names for m in (["precision", "recall"] if name == "prc" else [name])]
    return Request(
        checkpoint=args.checkpoint,
        nfe=comma_list(args.nfe, int, "--nfe") if args.nfe else None,
        num=args.num,
        metrics=metrics,
        guidance=comma_list(args.guidance, float, "--guidance") if args.guidance else None,
        seeds=args.seeds,
        device=args.device,
    )


def add_study_command(sub, name: str, help_text: str, handler) -> argparse.ArgumentParser:
    """A command on a study file: STUDY, KEY=VALUE overrides and --profile."""
    s = sub.add_parser(name, help=help_text, description=help_text)
    s.add_argument("study", help="study YAML file")
    s.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides of the study, values in YAML: train.lr=1e-3 sets a value; a list "
        "('method.name=[lsd,esd]') makes or replaces a grid axis; applied after --profile",
    )
    s.add_argument("--profile", help="a named override set from the study's `profiles`")
    s.add_argument(
        "--backend",
        help="where trials run: ray, local, slurm or an installed one (default: the study's); replaces the "
        "file's backend section with its `backends.NAME` section, and backend.* overrides apply to it",
    )
    s.add_argument(
        "--cluster",
        metavar="NAME",
        help="a cluster profile from $ORCH_CLUSTERS or ~/.config/orch/clusters.yaml: backend options "
        "written once (account, qos, partition, setup), under the study's own",
    )
    s.set_defaults(func=handler)
    return s


def add_submitted_command(sub, name: str, help_text: str, handler) -> argparse.ArgumentParser:
    """A command on a submitted study: its name (or file) and --workdir."""
    s = sub.add_parser(name, help=help_text, description=help_text)
    s.add_argument("study", help="study name or study YAML file")
    s.add_argument("--workdir", default=default_workdir(), help=WORKDIR_HELP)
    s.set_defaults(func=handler)
    return s


def store_failure(error: BaseException, study: str | None) -> str:
    """The one line for a tracking store that failed: the database's own error and what to do about it."""
    from orch.tracking.store import store_error

    name = study if study and not study.endswith((".yaml", ".yml")) else "<study>"
    return (
        f"error: the tracking store failed ({store_error(error)}): if the study's mlflow.db is damaged, move it "
        f"aside and run `orch resume {name}`, which rebuilds it from the trial directories"
    )
