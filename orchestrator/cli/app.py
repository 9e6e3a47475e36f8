"""`orch`: the command line (docs/cli.md). Each command's options sit beside its handler in this package;
this module assembles them, in the order `orch --help` lists them."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from orch.cli.common import store_failure
from orch.cli.data import add_encode, add_fid, add_vae
from orch.cli.describe import add_describe
from orch.cli.eval import add_eval
from orch.cli.results import add_dashboard, add_table, add_ui
from orch.cli.sample import add_sample
from orch.cli.study import add_cancel, add_plan, add_prune, add_resume, add_status, add_submit, add_validate

COMMANDS = (
    add_validate,
    add_plan,
    add_submit,
    add_status,
    add_resume,
    add_cancel,
    add_prune,
    add_dashboard,
    add_fid,
    add_encode,
    add_vae,
    add_eval,
    add_sample,
    add_table,
    add_describe,
    add_ui,
)
"""Every command, in the order of `orch --help`."""


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    from orch.tracking.source import git_commit

    try:
        number = package_version("orch")
    except PackageNotFoundError:
        number = "(not installed)"
    return f"orch {number} (commit {git_commit()})"


class ShowVersion(argparse.Action):
    """--version, worked out only when asked: finding the commit runs git twice, which every other command
    would otherwise pay for at start."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version())
        parser.exit()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orch", description="Run and compare few-step generative-model studies.")
    p.add_argument("--version", action=ShowVersion, help="print orch's version and commit")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines: only the summary and errors")
    p.add_argument("--share", action="store_true", help="let your group read what orch writes (default: only you)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def answer_interrupts() -> None:
    """Ctrl-C and `kill -INT` stop orch even when it inherited SIGINT as ignored (started in the background by a
    script, or under a tool that ignores it): Python then installs no KeyboardInterrupt handler, and every
    process orch starts (Ray's, a server's) would ignore SIGINT too."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


PRIVATE, SHARED = 0o077, 0o027
"""The umask of orch and everything it starts: files 0600 and folders 0700, or with --share 0640 and 0750."""


def main(argv: list[str] | None = None) -> int:
    answer_interrupts()
    command_line = parser()
    args, extra = command_line.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # KEY=VALUE after options: argparse leaves them over
    elif extra:
        command_line.error(f"unrecognized arguments: {' '.join(extra)}")
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    from orch.progress import set_quiet
    from orch.tracking.source import SOURCE

    set_quiet(args.quiet)
    SOURCE["name"] = " ".join(["orch", args.command, getattr(args, "study", None) or ""]).strip()
    umask = os.umask(SHARED if args.share else PRIVATE)  # the processes orch starts inherit it
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: end as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush must not raise again
        return 128 + signal.SIGPIPE
    except Exception as e:
        if not store_failed(e):
            raise
        print(store_failure(e, getattr(args, "study", None)), file=sys.stderr)
        return 1
    finally:
        os.umask(umask)


def store_failed(error: Exception) -> bool:
    """Whether the error is MLflow's or its database's (their modules are imported by then if it is)."""
    kinds = [getattr(sys.modules.get(m), c, None) for m, c in STORE_ERRORS]
    return isinstance(error, tuple(k for k in kinds if k is not None))


STORE_ERRORS = (("mlflow.exceptions", "MlflowException"), ("sqlalchemy.exc", "SQLAlchemyError"), ("sqlite3", "Error"))
