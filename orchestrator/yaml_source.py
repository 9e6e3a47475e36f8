"""Safe YAML reading that keeps line numbers for error messages and rejects duplicate keys."""

from __future__ import annotations

import re
from typing import Any

import yaml


class StudyLoader(yaml.SafeLoader):
    """SafeLoader (no Python tags, no code) that also reads 1e-3 as a float, as YAML 1.2 and users expect."""


StudyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def key_lines(text: str) -> tuple[dict[tuple[str, ...], int], list[tuple[tuple[str, ...], int]]]:
    """Line (1-based) of every mapping key by its path, and the duplicated keys. The text must parse."""
    lines: dict[tuple[str, ...], int] = {}
    duplicates: list[tuple[tuple[str, ...], int]] = []

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, str(key_node.value))
                if key in lines:
                    duplicates.append((key, key_node.start_mark.line + 1))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, str(i))] = item.start_mark.line + 1
                walk(item, (*path, str(i)))

    root = yaml.compose(text, Loader=StudyLoader)
    if root is not None:
        walk(root, ())
    return lines, duplicates


def parse(text: str) -> Any:
    return yaml.load(text, Loader=StudyLoader)  # noqa: S506 — StudyLoader is a SafeLoader
