"""Where a result comes from: the command that runs and the code's commit, for MLflow's source columns. Kept
apart from the store so that every command can name itself without importing MLflow."""

from __future__ import annotations

import contextlib
import getpass
import subprocess
from pathlib import Path

from orch.tracking.schema import SOURCE_COMMIT, SOURCE_NAME, SOURCE_TYPE, USER

SOURCE = {"name": "orch"}
"""The command that runs, for MLflow's Source column (set by the CLI: e.g. "orch submit studies/x.yaml")."""


def git_commit() -> str:
    """HEAD of the checkout orch runs from, with "-dirty" when tracked files differ from it."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=here,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def source_tags() -> dict[str, str]:
    """MLflow's own source columns: the command, the user, the code's commit."""
    tags = {SOURCE_NAME: SOURCE["name"], SOURCE_TYPE: "LOCAL"}
    with contextlib.suppress(KeyError, OSError):
        tags[USER] = getpass.getuser()
    if (commit := git_commit()) != "unknown":
        tags[SOURCE_COMMIT] = commit.removesuffix("-dirty")
    return tags
