"""Problems with a study, reported all at once: where (key path, file line) and what."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError


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
