"""The command layer: `orch` and its commands (docs/cli.md). The only part of orch that composes the dashboards
with the rest."""

from orch.cli.app import main

__all__ = ["main"]
