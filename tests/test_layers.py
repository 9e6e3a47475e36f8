"""The arrows only point down: every import of every module of orch (module-level and inside functions, read
from the source with `ast`) goes to a lower layer or stays inside its own package, and no modules import each
other in a circle. docs/architecture.md lists the layers."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"orchestrator": "orch", "methods": "orch.methods", "dashboards": "orch.dashboards"}
"""Where each import package's files are (pyproject.toml maps the folders into the one namespace `orch`)."""

LAYERS: list[tuple[str, ...]] = [
    # science (orch.methods): knows nothing of studies, backends, MLflow or dashboards
    ("orch.methods.runtime",),
    ("orch.methods.contracts",),
    ("orch.methods.networks", "orch.methods.data", "orch.methods.losses"),
    ("orch.methods.evaluation",),
    ("orch.methods.training",),
    ("orch.methods.catalog",),
    # orchestration (orch)
    ("orch.problems",),
    ("orch.trial",),
    ("orch.tracking",),
    ("orch.execution",),
    ("orch.lock", "orch.progress", "orch.preflight"),
    ("orch.backends",),
    ("orch.study",),
    ("orch.eval",),
    ("orch.driver", "orch.sample"),
    # dashboards: read what orchestration wrote (below the command layer, which alone composes them)
    ("orch.dashboards",),
    # the command layer and the plugin API on top: nothing of orch imports them
    ("orch.cli",),
    ("orch.api",),
]
"""Bottom to top. A module may import a lower layer, or its own group (the package or module named here); two
groups of one layer are peers and import neither each other nor anything above."""

DASHBOARDS_READ = ("orch.methods", "orch.problems", "orch.trial", "orch.tracking")
"""What the dashboards may import: they read MLflow and the trial directories, never run anything."""

ROOTS = ("orch", "orch.methods", "orch.dashboards")
"""Package roots: their __init__ holds only a docstring; any module may import them."""


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, str]:
    """Every module of orch → its source."""
    return {module_name(path): path.read_text() for folder in FOLDERS for path in sorted((ROOT / folder).rglob("*.py"))}


def imports(source: str, modules: set[str]) -> set[str]:
    """The orch modules a source imports anywhere in it (`from a.b import c` counts as a.b.c when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "orch" or name.startswith("orch.")} | {
        name
        for name in found
        if name.split(".")[0] in FOLDERS  # the folders' own names: never importable
    }


def group_of(module: str) -> tuple[int, str]:
    """(layer index, group) of a module; ValueError for a module no layer names."""
    for index, groups in enumerate(LAYERS):
        for group in groups:
            if module == group or module.startswith(group + "."):
                return index, group
    raise ValueError(f"{module} is in no layer of tests/test_layers.py")


def arrow_problems(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up, sideways to a peer, or from the dashboards into what runs studies."""
    problems = []
    for module, targets in sorted(graph.items()):
        if module in ROOTS:
            continue
        layer, group = group_of(module)
        for target in sorted(targets):
            if target.split(".")[0] in FOLDERS:
                problems.append(f"{module} imports {target}: a folder name, not the installed package orch")
                continue
            if target in ROOTS:
                continue
            target_layer, target_group = group_of(target)
            if group == "orch.dashboards" and not target.startswith(DASHBOARDS_READ + ("orch.dashboards",)):
                problems.append(f"{module} imports {target}: the dashboards only read ({', '.join(DASHBOARDS_READ)})")
            elif target_group != group and target_layer >= layer:
                direction = "a peer" if target_layer == layer else "upward"
                problems.append(f"{module} imports {target}: {direction} ({group} → {target_group})")
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                found.append(sorted(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def import_graph(code: dict[str, str]) -> dict[str, set[str]]:
    modules = set(code)
    return {module: imports(source, modules) - {module} for module, source in code.items()}


def test_every_import_points_down_and_nothing_imports_in_a_circle():
    graph = import_graph(sources())
    assert arrow_problems(graph) == []
    assert circles(graph) == []


def test_a_planted_upward_import_and_a_planted_circle_are_named():
    code = sources()
    code["orch.methods.losses.flow_matching"] += "\n\ndef f():\n    from orch.cli import main\n"
    code["orch.methods.runtime.parallel"] += "\nfrom orch.methods.runtime.storage import atomic_write_bytes\n"
    code["orch.methods.runtime.storage"] += "\nfrom orch.methods.runtime.parallel import Gen\n"
    code["orch.trial.state"] += "\nimport methods.catalog\n"
    graph = import_graph(code)
    problems = arrow_problems(graph)
    assert "orch.methods.losses.flow_matching imports orch.cli: upward (orch.methods.losses → orch.cli)" in problems
    assert any(p.startswith("orch.trial.state imports methods.catalog: a folder name") for p in problems)
    assert ["orch.methods.runtime.parallel", "orch.methods.runtime.storage"] in circles(graph)


def test_every_module_is_in_a_layer():
    for module in sources():
        if module not in ROOTS:
            group_of(module)


def test_every_package_folder_is_installed():
    """pyproject.toml lists the packages a wheel holds: every folder of orch with an __init__.py is one of them."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {module_name(path) for folder in FOLDERS for path in (ROOT / folder).rglob("__init__.py")}
    assert folders == listed
