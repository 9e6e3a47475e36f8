"""Name → builder registries: the only way a study file can select code (no eval; a study file never names a module)."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_COUNT = 10**9
"""Upper bound on every integer option unless the option documents a tighter one."""
MAX_STEPS, MAX_BATCH, MAX_SAMPLES, MAX_NFE = 10**8, 10**7, 10**6, 1024
"""Bounds of train.steps, batch sizes, eval sample counts and eval.nfe values: far above any paper's setting
(800k steps, batch 100,000, FID-50k, 16 steps), low enough that a typo fails validation instead of running for
ever."""
Steps = Annotated[int, Field(gt=0, le=MAX_STEPS)]
Batch = Annotated[int, Field(gt=0, le=MAX_BATCH)]
Samples = Annotated[int, Field(gt=0, le=MAX_SAMPLES)]


class Params(BaseModel):
    """Base class of every registered component's options: unknown keys and loose types are errors, every float
    is finite and every integer at most MAX_COUNT."""

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True, allow_inf_nan=False
    )

    @field_validator("*", mode="after")
    @classmethod
    def bounded_counts(cls, value: Any) -> Any:
        values = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_COUNT for v in values):
            raise ValueError(f"must be at most {MAX_COUNT:,}")
        return value


class UnknownName(KeyError):
    def __init__(self, kind: str, name: object, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        hint = difflib.get_close_matches(str(name), known, n=1)
        self.message = f"unknown {kind} {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        self.message += f"; known: {', '.join(known)}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[..., Any]
    params: type[Params]
    doc: str
    """What it is, in a sentence or two (the first paragraph of its docstring)."""
    provides: frozenset[str] = frozenset()
    """Capabilities, e.g. a dataset with a known density provides "density"."""
    requires: frozenset[str] = frozenset()
    """Capabilities needed of the other components, e.g. the KL metric requires "density"."""


class Registry:
    """A named set of builders, each with a pydantic model of its options."""

    before_first_read: ClassVar[list[Callable[[], object]]] = []
    """Run once, before any registry is first read: the catalogue's loading of installed plugins. A plugin may
    import any part of orch (orch.api does), so it cannot load while orch's own modules are still importing."""
    _read = False

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    @classmethod
    def _first_read(cls) -> None:
        if not Registry._read:
            Registry._read = True  # before the hooks: a plugin that reads a registry while loading reads it as is
            for hook in cls.before_first_read:
                hook()

    def register(
        self,
        name: str,
        params: type[Params] = Params,
        provides: tuple[str, ...] = (),
        requires: tuple[str, ...] = (),
        doc: str | None = None,
    ):
        """A decorator registering a builder (a function or a class) under `name`; its documentation is `doc`,
        else the first paragraph of its docstring."""

        def decorator(build: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            summary = " ".join((doc or build.__doc__ or "").strip().split("\n\n")[0].split())
            self._entries[name] = Entry(name, build, params, summary, frozenset(provides), frozenset(requires))
            return build

        return decorator

    def unregister(self, name: str) -> None:
        """Remove `name` (a component registered for one test or one interactive session)."""
        self.get(name)
        del self._entries[name]

    def get(self, name: object) -> Entry:
        self._first_read()
        if not isinstance(name, str) or name not in self._entries:
            raise UnknownName(self.kind, name, self.names())
        return self._entries[name]

    def names(self) -> list[str]:
        self._first_read()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._first_read()
        return name in self._entries


def import_folder(package: ModuleType, skip: tuple[str, ...] = ()) -> list[str]:
    """Import every module of a package's folder, so that each registers what it defines: orch's own files, never
    a name from a study file. Sub-packages, modules named with a leading `_` (helpers of one module) and `skip`
    are left out. Returns the imported modules' names."""
    names = []
    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not module.ispkg and not module.name.startswith("_") and module.name not in skip:
            names.append(importlib.import_module(f"{package.__name__}.{module.name}").__name__)
    return names
