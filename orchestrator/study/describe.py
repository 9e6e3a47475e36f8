"""`orch describe`: every option of a study file, with its default and meaning, read from the registered
components' Params (their field docstrings). The option reference, docs/reference.md, is this text, so the two
cannot drift (tests/test_describe.py checks it; `make docs` rewrites it)."""

from __future__ import annotations

import difflib
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from orch.backends.base import DEFAULT_BACKEND
from orch.backends.catalog import BACKENDS
from orch.backends.search_space import Search
from orch.methods.catalog import DATASETS, METHODS, METRICS, MODELS, TIME_SAMPLERS
from orch.methods.contracts.registry import Params, Registry
from orch.methods.training.trainer import EvalConfig, TrainConfig

REGISTERED: dict[str, tuple[Registry, str]] = {
    "dataset": (DATASETS, "checkerboard"),
    "model": (MODELS, "mlp"),
    "method": (METHODS, "lsd"),
    "time_sampler": (TIME_SAMPLERS, "auto"),
    "backend": (BACKENDS, DEFAULT_BACKEND),
}
"""Sections that name a registered component (`name:`), with the default name."""
FIXED: dict[str, type[Params]] = {"train": TrainConfig, "eval": EvalConfig, "search": Search}
"""Sections with one set of options."""
ORDER = ["dataset", "model", "method", "time_sampler", "train", "eval", "metric", "backend", "search"]
BEGIN, END = "<!-- orch describe: begin -->", "<!-- orch describe: end -->"
REFERENCE = Path("docs/reference.md")


class UnknownSection(ValueError):
    """A SECTION[.NAME] that names nothing describable."""


def shown_default(value: Any) -> str:
    """A default as it is written in a study file (YAML)."""
    if value is PydanticUndefined:
        return "required"
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip().removesuffix("\n...").strip()


def meaning(field) -> str:
    """The field's docstring on one line, with its choices when it takes a fixed set of values."""
    text = " ".join((field.description or "").split())
    choices = literal_choices(field.annotation)
    if choices and len(choices) > 1:
        text = f"one of {', '.join(map(str, choices))}. {text}".strip()
    return text.replace("|", "\\|")


def literal_choices(annotation) -> list:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return []


def option_rows(model: type[BaseModel], prefix: str) -> list[str]:
    """Markdown table rows `| prefix.field | default | meaning |`, nested option groups expanded."""
    rows = []
    for name, field in model.model_fields.items():
        if name == "name" and prefix.count(".") == 0 and prefix.split(".")[0] in REGISTERED:
            continue  # the component's name is its entry, not an option
        inner = field.annotation
        inner = next((a for a in typing.get_args(inner) if isinstance(a, type)), inner) if inner else inner
        if isinstance(inner, type) and issubclass(inner, BaseModel) and inner is not Search:
            rows += option_rows(inner, f"{prefix}.{name}")
            continue
        default = shown_default(field.get_default(call_default_factory=True))
        rows.append(f"| `{prefix}.{name}` | {default} | {meaning(field)} |")
    return rows


TABLE_HEAD = ["| option | default | meaning |", "|---|---|---|"]


def describe_component(section: str, name: str) -> list[str]:
    registry, default = REGISTERED[section]
    entry = registry.get(name)
    head = f"**`{section}.name: {name}`**" + (" (default)" if name == default else "") + f" — {entry.doc}"
    rows = option_rows(entry.params, section)
    return [head, "", *(TABLE_HEAD + rows if rows else ["No options."]), ""]


def describe_metrics(names: list[str]) -> list[str]:
    lines = ["| `eval.metrics` entry | better | needs | measures |", "|---|---|---|---|"]
    for name in names:
        entry, spec = METRICS.get(name), METRICS.get(name).build
        needs = ", ".join(sorted(entry.requires)) or "–"
        lines.append(f"| `{name}` | {'lower' if spec.direction == 'min' else 'higher'} | {needs} | {entry.doc} |")
    own = [name for name in names if METRICS.get(name).build.options_model is not None]
    for name in own:
        rows = option_rows(METRICS.get(name).build.options_model, f"eval.metric_options.{name}")
        lines += ["", f"Options of `{name}`:", "", *TABLE_HEAD, *rows]
    return [*lines, ""]


def describe_section(section: str, name: str | None = None) -> list[str]:
    """Markdown for a section, or one component (a registered section) or option (a fixed one) of it."""
    if section in REGISTERED:
        registry, _ = REGISTERED[section]
        names = [name] if name is not None else registry.names()
        if name is not None and name not in registry:
            raise UnknownSection(f"no {section} {name!r}{hint(name, registry.names())}")
        body = [line for n in names for line in describe_component(section, n)]
        return [f"#### `{section}`", "", *body]
    if section == "metric":
        if name is not None and name not in METRICS:
            raise UnknownSection(f"no metric {name!r}{hint(name, METRICS.names())}")
        return ["#### metrics", "", *describe_metrics([name] if name else METRICS.names())]
    if section in FIXED:
        rows = option_rows(FIXED[section], section)
        if name is not None:
            rows = [r for r in rows if r.startswith(f"| `{section}.{name}`")]
            if not rows:
                raise UnknownSection(f"no option {section}.{name}{hint(name, list(FIXED[section].model_fields))}")
        doc = (FIXED[section].__doc__ or "").strip().splitlines()[0]
        return [f"#### `{section}`", "", doc, "", *TABLE_HEAD, *rows, ""]
    raise UnknownSection(f"no section {section!r}{hint(section, ORDER)}; sections: {', '.join(ORDER)}")


def hint(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe(target: str | None = None) -> str:
    """The reference of `target` (SECTION or SECTION.NAME), or of every section. Raises UnknownSection."""
    if target is None:
        return "\n".join(line for section in ORDER for line in describe_section(section)).rstrip() + "\n"
    section, _, name = target.partition(".")
    return "\n".join(describe_section(section, name or None)).rstrip() + "\n"


def reference_block(text: str) -> tuple[int, int]:
    """Character offsets of the generated part of the option reference (between its markers)."""
    return text.index(BEGIN) + len(BEGIN), text.index(END)


def update_reference(path: Path) -> bool:
    """Rewrite the generated part of the option reference from the code; True when it changed."""
    text = path.read_text()
    start, end = reference_block(text)
    new = text[:start] + "\n" + describe() + text[end:]
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":  # `make docs`
    changed = update_reference(Path(sys.argv[1]) if len(sys.argv) > 1 else REFERENCE)
    print(f"option reference {'rewritten' if changed else 'already up to date'}")
