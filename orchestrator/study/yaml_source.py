"""Safe YAML reading that keeps line numbers for error messages, rejects duplicate keys, and refuses hostile
input (huge files, deep nesting, alias bombs) before anything is expanded."""

from __future__ import annotations

import re
from typing import Any

import yaml

from orch.problems import Problem, StudyError

MAX_BYTES = 1 << 20
"""Largest study file read (1 MiB; the shipped studies are a few KB)."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists."""
MAX_NODES = 100_000
"""Most values a study may hold once its YAML aliases are expanded (each scalar, mapping and list counts one)."""


class StudyLoader(yaml.SafeLoader):
    """SafeLoader (no Python tags, no code) that also reads 1e-3 as a float, as YAML 1.2 and users expect."""


StudyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class YAMLLimit(ValueError):
    """A study file past one of the documented limits; `line` is where it was noticed (1-based) or None."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def check_limits(text: str) -> None:
    """Refuse text past MAX_BYTES, MAX_DEPTH or MAX_NODES, from the parser's events alone: nothing is composed
    or constructed, so an alias bomb or a 20,000-deep nesting costs no more than reading it. Raises YAMLLimit
    (or yaml.YAMLError for text that is not YAML)."""
    size = len(text.encode())
    if size > MAX_BYTES:
        raise YAMLLimit(f"the file is {size / 2**20:.1f} MiB; study files are limited to {MAX_BYTES // 2**20} MiB")
    sizes: dict[str, int] = {}  # anchor → values under it, aliases expanded
    open_nodes: list[list] = []  # [anchor, values so far] of each mapping or list being read
    for event in yaml.parse(text, Loader=StudyLoader):
        line = event.start_mark.line + 1
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_nodes) >= MAX_DEPTH:
                raise YAMLLimit(f"nesting deeper than {MAX_DEPTH} levels", line)
            open_nodes.append([event.anchor, 1])
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, count = open_nodes.pop()
        elif isinstance(event, yaml.ScalarEvent):
            anchor, count = event.anchor, 1
        elif isinstance(event, yaml.AliasEvent):
            anchor, count = None, sizes.get(event.anchor, 1)
        else:
            continue
        if anchor is not None:
            sizes[anchor] = count
        if open_nodes:
            open_nodes[-1][1] += count
        if max(count, sum(n for _, n in open_nodes)) > MAX_NODES:  # the values read so far, aliases expanded
            raise YAMLLimit(f"more than {MAX_NODES:,} values once YAML aliases are expanded", line)


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


def with_lines(problems: list[Problem], text: str) -> list[Problem]:
    """Attach the study file's line to each problem that has none, from the longest key path that exists in the
    file (line 0: a problem written outside the file, e.g. on the command line)."""
    lines, _ = key_lines(text)
    located = []
    for p in problems:
        if p.line is not None:
            located.append(p)
            continue
        parts = tuple(p.path.split(".")) if p.path else ()
        # grid, exclude and search keys are dotted names themselves: try every way of joining the parts
        candidates = [(*parts[:i], ".".join(parts[i:j])) for j in range(len(parts), 0, -1) for i in range(j)]
        line = next((lines[c] for c in candidates if c in lines), None)
        located.append(Problem(p.path, p.message, line))
    return located


def read_raw(text: str, source: str) -> dict:
    """The study file as data: within the limits, plain YAML, no duplicate keys, a mapping. Raises StudyError."""
    try:
        check_limits(text)
        raw = parse(text)
        _, duplicates = key_lines(text)
    except YAMLLimit as e:
        raise StudyError(source, [Problem("", str(e), e.line)]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        message = f"not valid YAML for a study: {getattr(e, 'problem', None) or e}"
        if "constructor" in str(e) or "tag" in str(getattr(e, "problem", "")):
            message = f"unsupported YAML tag: {getattr(e, 'problem', e)} (study files are plain data)"
        raise StudyError(source, [Problem("", message, mark.line + 1 if mark else None)]) from None
    if duplicates:
        raise StudyError(source, [Problem(".".join(k), "duplicate key", line) for k, line in duplicates])
    if not isinstance(raw, dict):
        raise StudyError(source, [Problem("", f"a study is a mapping with name/base/grid…, got {type(raw).__name__}")])
    return raw
