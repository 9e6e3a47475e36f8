"""The published results (dashboards/published.yaml) and when a study's values are comparable with them."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import plotly.graph_objects as go
import yaml
from pydantic import BaseModel, ConfigDict, PositiveInt

PUBLISHED = Path(__file__).with_name("published.yaml")


class Published(BaseModel):
    """One table of a paper: its numbers per method and NFE, and the protocol they were measured under."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str
    status: Literal["verified", "secondary"]
    dataset: str
    metric: str
    num_samples: PositiveInt
    conditional: bool
    checkpoint: str
    note: str = ""
    results: dict[str, dict[PositiveInt, float]]


class PublishedFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: PositiveInt
    entries: list[Published]


@functools.cache
def published(path: Path = PUBLISHED) -> PublishedFile:
    return PublishedFile.model_validate(yaml.safe_load(path.read_text()))


def not_comparable(entry: Published, dataset: str, metric: str, num_samples: int, conditional: bool) -> str | None:
    """Why a study's values (of `metric` on `dataset` from `num_samples` samples) cannot stand beside the entry's,
    or None when the protocols match. Only entries of the same dataset and metric are asked about."""
    if entry.conditional != conditional:
        return f"{'class-conditional' if entry.conditional else 'unconditional'} there"
    if entry.num_samples != num_samples:
        return f"{entry.num_samples:,} samples there, {num_samples:,} here"
    return None


def entries_for(dataset: str, metric: str) -> list[Published]:
    return [e for e in published().entries if e.dataset == dataset and e.metric == metric]


def training_protocol(runs) -> tuple[str, int, bool] | None:
    """(dataset, sample count, conditional) of the runs' in-training evaluations, or None when the trials
    disagree (then nothing published is comparable)."""
    counts = set(runs["eval.num_samples"].dropna()) if "eval.num_samples" in runs else set()
    datasets = set(runs["dataset.name"].dropna()) if "dataset.name" in runs else set()
    if len(counts) != 1 or len(datasets) != 1:
        return None
    return next(iter(datasets)), int(next(iter(counts))), conditional_of(runs)


def conditional_of(runs) -> bool:
    return "dataset.conditional" in runs and bool(runs["dataset.conditional"].fillna(False).astype(bool).any())


def reference_markers(protocol: tuple[str, int, bool] | None, metric: str, methods: set[str]):
    """Scatter traces of the published values comparable with values measured under `protocol` (dataset, sample
    count, conditional), one per entry and method the study runs, and a line for each entry of the same dataset
    and metric that is not comparable, saying why."""
    if protocol is None:
        return [], []
    dataset, num, conditional = protocol
    traces, notes = [], []
    for entry in entries_for(dataset, metric):
        shown = {m: r for m, r in entry.results.items() if m in methods}
        if not shown:
            continue
        why = not_comparable(entry, dataset, metric, num, conditional)
        if why is not None:
            notes.append(f"Published {metric} of {', '.join(sorted(shown))} ({entry.source}): not comparable ({why}).")
            continue
        for method, values in shown.items():
            nfes = sorted(values)
            traces.append(
                go.Scatter(
                    x=nfes,
                    y=[values[n] for n in nfes],
                    name=f"published: {method}",
                    mode="markers",
                    marker={"symbol": "star", "size": 11, "color": "black"},
                    hovertemplate=f"{method} %{{y}} at NFE %{{x}}<br>{entry.source} ({entry.status}; "
                    f"{entry.checkpoint}; {entry.note})<extra></extra>",
                )
            )
    return traces, notes
