"""Problems with a study, reported all at once: where (key path, file line) and what."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from orchestrator.study.yaml_source import key_lines


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a study file: where (dotted key path, file line if known) and what."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.path or "(top level)"
        return f"{where}{f' (line {self.line})' if self.line else ''}: {self.message}"


def did_you_mean(name: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def pydantic_problems(error: ValidationError, prefix: str, model: type[BaseModel], context: str) -> list[Problem]:
    problems = []
    for e in error.errors():
        path = ".".join(part for part in [prefix, *map(str, e["loc"])] if part)
        if e["type"] == "extra_forbidden":
            key = str(e["loc"][-1])
            known = sorted(model.model_fields)
            message = f"unknown key {key!r} for {context}{did_you_mean(key, known)}; known: {', '.join(known)}"
        elif e["type"] == "too_short":
            message = f"empty list: give at least one value [{context}]"
        else:
            message = f"{e['msg']} (got {e['input']!r})" if "input" in e else e["msg"]
            message += f" [{context}]"
        problems.append(Problem(path, message))
    return problems


class StudyError(Exception):
    """A study file that cannot run; carries every problem found."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source, self.problems = source, problems
        super().__init__(f"{source}: {len(problems)} problem(s)")

    def report(self) -> str:
        lines = [f"error: {self.source} is not a valid study ({len(self.problems)} problem(s)):"]
        return "\n".join(lines + [f"  - {p}" for p in self.problems])


def with_lines(problems: list[Problem], text: str) -> list[Problem]:
    """Attach the study file's line to each problem, from the longest key path that exists in the file."""
    lines, _ = key_lines(text)
    located = []
    for p in problems:
        parts = tuple(p.path.split(".")) if p.path else ()
        # grid, exclude and search keys are dotted names themselves: try every way of joining the parts
        candidates = [(*parts[:i], ".".join(parts[i:j])) for j in range(len(parts), 0, -1) for i in range(j)]
        line = next((lines[c] for c in candidates if c in lines), None)
        located.append(Problem(p.path, p.message, line))
    return located
