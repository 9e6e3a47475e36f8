"""Assemble the study dashboard: one self-contained HTML file (plotly.js inlined, works offline)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from dashboards import figures
from dashboards.load import FACTOR, load_runs
from methods.storage import atomic_write_bytes

HEADER_TAGS = {  # parent-run tag → header label
    "orch.profile": "profile",
    "orch.git_commit": "last submitted at commit",
    "orch.python": "python",
    "orch.host": "host",
    "orch.version.torch": "torch",
    "orch.version.ray": "ray",
    "orch.version.mlflow": "mlflow",
}


def quality_metrics(columns) -> list[str]:
    return sorted({m["metric"] for c in columns if (m := figures.NFE_KEY.match(str(c)))})


def comparable_subsets(runs: pd.DataFrame, metric: str):
    """(title suffix, runs) per metric fingerprint: values measured differently are never plotted together."""
    column = f"fingerprint.{metric}"
    if column not in runs or runs[column].nunique() <= 1:
        yield "", runs
        return
    for fingerprint, subset in runs.groupby(column):
        yield f" [fingerprint {fingerprint}]", subset


def build_figures(
    runs: pd.DataFrame, history: pd.DataFrame, group_cols: list[str], grid: dict, search: dict | None = None
) -> list[go.Figure]:
    figs = []
    if search is not None and len(runs):
        figs += [
            figures.search_progress(runs, search["metric"], search["mode"]),
            figures.search_parameters(runs, search["metric"], search["space"]),
        ]
    for metric in quality_metrics(runs.columns):
        for suffix, subset in comparable_subsets(runs, metric):
            hist = history[history["trial_id"].isin(subset["trial_id"])]
            panel = [
                figures.ranking_table(subset, hist, metric, group_cols),
                figures.quality_vs_nfe(subset, hist, metric, group_cols),
                figures.factor_effects(subset, metric, grid),
                figures.quality_vs_compute(subset, hist, metric, group_cols),
            ]
            for fig in panel:
                fig.update_layout(title_text=fig.layout.title.text + suffix)
            figs += panel
    figs += [
        figures.target_std_vs_step(history, runs, group_cols),
        figures.target_std_by_bin(history, runs, group_cols),
        figures.cost_by_group(runs, group_cols),
        figures.training_curves(history, runs, group_cols),
    ]
    return [f for f in figs if f.data]


def render_html(
    title: str,
    header: dict[str, str],
    figs: list[go.Figure],
    notes: list[str],
    study_yaml: str,
    refresh_seconds: int | None = None,
) -> str:
    meta = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in header.items())
    divs = "\n".join(f'<div class="figure">{f.to_html(full_html=False, include_plotlyjs=False)}</div>' for f in figs)
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>body{{font-family:sans-serif;margin:24px;max-width:1300px}} th{{text-align:left;padding-right:12px}}
.figure{{margin:24px 0;border-top:1px solid #ddd}} pre{{background:#f6f6f6;padding:8px}}</style></head>
<body><h1>{html.escape(title)}</h1><table>{meta}</table><ul>{notes_html}</ul>
<details><summary>study file</summary><pre>{html.escape(study_yaml)}</pre></details>
{divs}
</body></html>
"""


def current_version(runs: pd.DataFrame, generation: str | None) -> tuple[pd.DataFrame, int]:
    """The trials the study's last submitted version planned, and how many others (earlier versions) there are."""
    if generation is None or "generation" not in runs or not len(runs):
        return runs, 0
    current = runs["generation"] == generation
    return runs[current].reset_index(drop=True), int((~current).sum())


def factor_groups(runs: pd.DataFrame, axes: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The group columns (every factor of the trials but the seed, in the study's axis order, then any searched
    key) and, for factor effects, each grid axis's levels in their order on the axis. Trials are grouped by the
    level each one was planned with, so two different option sets of one axis never merge, and every sample of
    a search is its own group."""
    columns = [c for c in runs.columns if c.startswith(FACTOR)]
    order = {f"{FACTOR}{a}": i for i, a in enumerate(axes)}
    columns.sort(key=lambda c: (order.get(c, len(order)), c))
    grid = {}
    for column in columns:
        indexed = runs[[column, column.replace(FACTOR, "factor_index.", 1)]].dropna().drop_duplicates()
        if len(indexed):
            grid[column] = list(indexed.sort_values(indexed.columns[1])[column])
    return [c for c in columns if c != figures.SEED], grid


def dashboard_html(tracking_uri: str, study: str) -> str:
    """The dashboard page of a study, read from its MLflow experiment."""
    runs, history, parent_tags = load_runs(tracking_uri, study)
    runs, older = current_version(runs, parent_tags.get("orch.generation"))
    history = history[history["trial_id"].isin(runs["trial_id"])] if len(runs) else history.iloc[0:0]
    group_cols, grid = factor_groups(runs, json.loads(parent_tags.get("orch.axes", "[]")))
    group_cols = group_cols or (["method.name"] if "method.name" in runs.columns else [])
    header = {"study": study, "trials": str(len(runs))}
    if older:
        header["trials of earlier versions (not shown)"] = f"{older}: `orch status {study} --all`, `orch prune {study}`"
    if len(runs):
        header |= {f"trials {s}": str(n) for s, n in runs["status"].value_counts().items()}
    header |= {label: parent_tags[tag] for tag, label in HEADER_TAGS.items() if tag in parent_tags}
    for column, title in (("git_commit", "trials ran at commit"), ("device", "trials ran on")):
        if column in runs.columns:  # each trial records its own; a study resumed across commits shows them all
            header[title] = ", ".join(sorted(runs[column].dropna().astype(str).unique())) or "unknown"
    for column in sorted(c for c in runs.columns if c.startswith("fingerprint.")):
        header[f"{column.split('.', 1)[1]} fingerprint"] = ", ".join(sorted(runs[column].dropna().unique()))
    notes = [
        f"Grouped by {', '.join(c.removeprefix(FACTOR) for c in group_cols) or 'nothing'}"
        f"; seeds ({figures.SEED.removeprefix(FACTOR)}) are averaged.",
        "KL = KL(data ‖ model) on a 50×50 histogram with exact target cell masses; lower is better.",
    ]
    if len(runs) and (runs["status"] == "diverged").any():
        diverged = runs[runs["status"] == "diverged"]
        notes += [f"diverged: {r.label} — {r.reason}" for r in diverged.itertuples()]
    study_yaml = parent_tags.get("orch.study_yaml", "")
    search = json.loads(parent_tags["orch.search"]) if "orch.search" in parent_tags else None
    figs = build_figures(runs, history, group_cols, grid, search)
    if "orch.best" in parent_tags:
        best = json.loads(parent_tags["orch.best"])
        notes.insert(0, f"Best sample: {best['label']} ({best['trial_id']}), {best['metric']} = {best['value']:.4g}.")
    return render_html(f"orch study: {study}", header, figs, notes, study_yaml)


def build_dashboard(tracking_uri: str, study: str, out_path: Path) -> Path:
    """Write the dashboard HTML atomically; returns its path."""
    atomic_write_bytes(out_path, dashboard_html(tracking_uri, study).encode())
    return out_path
