"""`orch describe`: every option of a study file with its default and meaning."""

from __future__ import annotations

import sys

from orch.cli.common import (
    EXIT_INVALID,
    EXIT_OK,
)


def cmd_describe(args) -> int:
    from orch.study.describe import UnknownSection, describe

    try:
        print(describe(args.target), end="")
    except UnknownSection as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def add_describe(sub) -> None:
    s = sub.add_parser("describe", help="every option of a study file with its default and meaning")
    s.add_argument("target", nargs="?", help="a section (method, train, …) or one entry (method.lsd, train.lr)")
    s.set_defaults(func=cmd_describe)
