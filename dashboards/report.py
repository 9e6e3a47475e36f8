"""Assemble the study dashboard: one self-contained HTML file (plotly.js inlined, works offline)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from orch.dashboards import figures
from orch.dashboards.load import FACTOR, load_runs, load_search
from orch.dashboards.published import conditional_of, reference_markers, training_protocol
from orch.dashboards.tables import final_values, paper_table
from orch.methods.runtime.storage import atomic_write_bytes
from orch.tracking.schema import (
    AXES,
    BEST,
    EVAL,
    FINAL,
    GENERATION,
    GIT_COMMIT,
    HOST,
    PROFILE,
    PYTHON,
    STUDY_YAML,
    VERSION,
    parse_eval_key,
)

HEADER_TAGS = {  # parent-run tag → header label
    PROFILE: "profile",
    GIT_COMMIT: "last submitted at commit",
    PYTHON: "python",
    HOST: "host",
    f"{VERSION}torch": "torch",
    f"{VERSION}ray": "ray",
    f"{VERSION}mlflow": "mlflow",
}


def quality_metrics(columns) -> list[str]:
    """The metrics evaluated at some NFE, in training (eval/…) or after it (final/…)."""
    keys = (parse_eval_key(c) for c in columns)
    return sorted({k.metric for k in keys if k is not None and k.omega == 1.0 and not k.rest})


def direction_of(runs: pd.DataFrame, metric: str) -> str:
    """min or max, as the trials recorded it (runs from before directions were recorded: min, as every metric
    was then)."""
    column = f"direction.{metric}"
    recorded = runs[column].dropna().unique() if column in runs else []
    return recorded[0] if len(recorded) else "min"


def comparable_subsets(runs: pd.DataFrame, metric: str):
    """(title suffix, runs) per metric fingerprint: values measured differently are never plotted together."""
    column = f"fingerprint.{metric}"
    if column not in runs or runs[column].nunique() <= 1:
        yield "", runs
        return
    for fingerprint, subset in runs.groupby(column):
        yield f" [fingerprint {fingerprint}]", subset


Block = go.Figure | str
"""A part of the page: a Plotly figure, or HTML of its own (sample images, download links)."""


def build_figures(
    runs: pd.DataFrame, history: pd.DataFrame, group_cols: list[str], grid: dict, search: dict | None = None
) -> list[go.Figure]:
    """The page's Plotly figures (those with data)."""
    return [b for b in page_blocks(runs, history, group_cols, grid, search) if isinstance(b, go.Figure)]


def page_blocks(
    runs: pd.DataFrame,
    history: pd.DataFrame,
    group_cols: list[str],
    grid: dict,
    search: dict | None = None,
    trials_dir: Path | None = None,
) -> list[Block]:
    """The page from top to bottom: figures, CSV downloads under the ranking tables, and the samples read from
    the trial directories (when given)."""
    blocks: list[Block] = []
    if search is not None and len(runs):
        blocks += [
            figures.search_progress(runs, search["metric"], search["mode"]),
            figures.search_parameters(runs, search["metric"], search["space"]),
        ]
    for metric in quality_metrics(runs.columns):
        direction = direction_of(runs, metric)
        for suffix, subset in comparable_subsets(runs, metric):
            hist = history[history["trial_id"].isin(subset["trial_id"])]
            panel = [
                figures.ranking_table(subset, hist, metric, group_cols, direction),
                figures.quality_vs_nfe(subset, hist, metric, group_cols, direction),
                figures.quality_vs_guidance(subset, metric, group_cols),
                figures.quality_vs_nfe_at_guidance(subset, metric, group_cols),
                figures.factor_effects(subset, metric, grid, direction),
                figures.quality_vs_compute(subset, hist, metric, group_cols, direction),
            ]
            final, notes, final_table = final_blocks(subset, hist, metric, group_cols, direction, panel)
            for fig in panel + final[:1]:
                fig.update_layout(title_text=(fig.layout.title.text or "") + suffix)
            name = f"{metric}{suffix.replace(' [fingerprint ', '-').rstrip(']')}"
            tables = {
                f"ranking_{name}.csv": figures.ranking(subset, hist, metric, group_cols, direction),
                f"quality_{name}.csv": figures.quality_table(subset, hist, metric, group_cols, direction),
                f"table_{name}.csv": paper_table(subset, metric, group_cols, direction),
            }
            if final:
                tables[f"final_{name}.csv"] = final_table
            blocks += [panel[0], *final, download_links(tables), *panel[1:]] + [note_block(n) for n in notes]
    if trials_dir is not None and len(runs):
        blocks += sample_blocks(runs, group_cols, trials_dir)
    blocks += [
        figures.target_std_vs_step(history, runs, group_cols),
        figures.target_std_by_bin(history, runs, group_cols),
        figures.cost_by_group(runs, group_cols),
        figures.training_curves(history, runs, group_cols),
    ]
    return [b for b in blocks if isinstance(b, str) or b.data]


def final_blocks(
    runs: pd.DataFrame, history: pd.DataFrame, metric: str, group_cols: list[str], direction: str, panel: list
) -> tuple[list[Block], list[str], pd.DataFrame]:
    """`orch eval`'s final evaluations of a metric, when the trials have them: their paper table, and the
    quality-vs-NFE figure (panel[1]) made switchable between the in-training and the final values; published
    results are drawn on whichever view's protocol they match. Returns (blocks before the downloads, notes,
    the final table)."""
    methods = set(runs["method.name"].dropna()) if "method.name" in runs else set()
    final, protocol, notes = final_values(runs, metric)
    views = {"in training": (panel[1], training_protocol(runs))}
    if protocol is not None:
        view = figures.quality_vs_nfe(
            figures.final_runs(final, metric), history.iloc[0:0], metric, group_cols, direction
        )
        view.update_layout(
            title_text=f"{metric.upper()} vs steps — final evaluation (orch eval): {protocol['measured_as']}"
        )
        views["final (orch eval)"] = (view, (protocol["dataset"], protocol["num_samples"], conditional_of(runs)))
    for name, (view, measured) in views.items():
        traces, why = reference_markers(measured, metric, methods)
        view.add_traces(traces)
        notes += [f"{name}: {line}" for line in why]
    if protocol is None:
        return [], notes, pd.DataFrame()
    figs = {name: view for name, (view, _) in views.items()}
    panel[1] = figures.switchable(figs, "final (orch eval)") if panel[1].data else figs["final (orch eval)"]
    table = paper_table(final, metric, group_cols, direction, "final")
    title = (
        f"Final evaluation (orch eval) by {metric}: mean ± half-range over seeds of each trial's mean over seed ranges"
    )
    return [figures.paper_table_figure(table, metric, title)], notes, table


def note_block(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def download_links(tables: dict[str, pd.DataFrame]) -> str:
    """Links that save each table as CSV (the data is in the page: offline, like the rest)."""
    links = []
    for filename, table in tables.items():
        data = base64.b64encode(table.to_csv(index=False).encode()).decode()
        links.append(
            f'<a download="{html.escape(filename)}" href="data:text/csv;base64,{data}">{html.escape(filename)}</a>'
        )
    return '<p class="downloads">Download: ' + " · ".join(links) + "</p>"


def preview_trials(runs: pd.DataFrame, group_cols: list[str]) -> dict[str, str]:
    """group → the trial whose samples represent it: its first completed seed."""
    done = figures.with_groups(runs[runs["status"] == "completed"], group_cols)
    seed_index = figures.SEED.replace("factor.", "factor_index.", 1)
    order = [seed_index, "trial_id"] if seed_index in done else ["trial_id"]
    return {group: rows.sort_values(order)["trial_id"].iloc[0] for group, rows in done.groupby("group", sort=True)}


def sample_blocks(runs: pd.DataFrame, group_cols: list[str], trials_dir: Path) -> list[Block]:
    """The samples of each group at every step count, read from the trial directories: a scatter grid for 2-D
    data, the logged image grids (inlined PNG) for images. Groups past MAX_PREVIEW_GROUPS are left out, said."""
    chosen = preview_trials(runs, group_cols)
    shown = dict(list(chosen.items())[:MAX_PREVIEW_GROUPS])
    points, images = {}, {}
    for group, trial_id in shown.items():
        folder = trials_dir / trial_id / "samples"
        for path in sorted(folder.glob("nfe_*")) if folder.is_dir() else []:
            if not path.stem.removeprefix("nfe_").isdigit():  # guided samples (nfe_<N>_cfg_<ω>): not this view
                continue
            nfe = int(path.stem.removeprefix("nfe_"))
            if path.suffix == ".npy":
                points.setdefault(group, {})[nfe] = np.load(path)
            elif path.suffix == ".png":
                images.setdefault(group, {})[nfe] = base64.b64encode(path.read_bytes()).decode()
    note = (
        f"<p>Samples of {len(shown)} of {len(chosen)} groups (the first {MAX_PREVIEW_GROUPS}).</p>"
        if len(chosen) > len(shown)
        else ""
    )
    blocks: list[Block] = []
    if points:
        blocks.append(figures.sample_scatter(points))
    if images:
        nfes = sorted({n for by_nfe in images.values() for n in by_nfe})
        head = "".join(f"<th>{n} step{'s' * (n > 1)}</th>" for n in nfes)
        rows = "".join(
            f"<tr><th>{html.escape(group)}</th>"
            + "".join(
                f'<td><img alt="{html.escape(group)}, {n} steps" src="data:image/png;base64,{by_nfe[n]}"></td>'
                if n in by_nfe
                else "<td></td>"
                for n in nfes
            )
            + "</tr>"
            for group, by_nfe in images.items()
        )
        blocks.append(
            '<div class="figure samples"><h3>Samples at the last evaluation (first seed of each group)</h3>'
            f"<table><tr><th></th>{head}</tr>{rows}</table></div>"
        )
    return blocks + ([note] if blocks and note else [])


MAX_PREVIEW_GROUPS = 24


def render_html(
    title: str,
    header: dict[str, str],
    blocks: list[Block],
    notes: list[str],
    study_yaml: str,
    refresh_seconds: int | None = None,
) -> str:
    meta = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in header.items())
    divs = "\n".join(
        b if isinstance(b, str) else f'<div class="figure">{b.to_html(full_html=False, include_plotlyjs=False)}</div>'
        for b in blocks
    )
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>body{{font-family:sans-serif;margin:24px;max-width:1300px}} th{{text-align:left;padding-right:12px}}
.figure{{margin:24px 0;border-top:1px solid #ddd}} pre{{background:#f6f6f6;padding:8px}}
.samples img{{max-width:260px;image-rendering:pixelated}} .samples td,.samples th{{padding:4px;vertical-align:top}}
.downloads{{font-size:90%}}</style></head>
<body><h1>{html.escape(title)}</h1><table>{meta}</table><ul>{notes_html}</ul>
<details><summary>study file</summary><pre>{html.escape(study_yaml)}</pre></details>
{divs}
</body></html>
"""


def current_version(runs: pd.DataFrame, generation: str | None) -> tuple[pd.DataFrame, int]:
    """The trials the study's last submitted version planned, and how many others (earlier versions) there are.
    Factors and evaluations that only earlier versions' trials have (a step count, an axis) go with them."""
    if generation is None or "generation" not in runs or not len(runs):
        return runs, 0
    current = runs["generation"] == generation
    kept = runs[current].reset_index(drop=True)
    theirs = [c for c in kept.columns if c.startswith((FACTOR, f"{EVAL}/", f"{FINAL}/")) and kept[c].isna().all()]
    return kept.drop(columns=theirs), int((~current).sum())


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


METRIC_NOTES = {
    "kl": "KL = KL(data ‖ model) on a 50×50 histogram with exact target cell masses; lower is better.",
    "fid": "FID = Fréchet distance of Inception pool3 features (torch-fidelity) to the training images; lower is "
    "better; values at different sample counts are not comparable.",
}


def study_frames(tracking_uri: str, study: str) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str], int]:
    """load_runs of the trials the study's last submitted version planned, and how many others there are."""
    runs, history, parent_tags = load_runs(tracking_uri, study)
    runs, older = current_version(runs, parent_tags.get(GENERATION))
    history = history[history["trial_id"].isin(runs["trial_id"])] if len(runs) else history.iloc[0:0]
    return runs, history, parent_tags, older


def study_groups(runs: pd.DataFrame, parent_tags: dict[str, str]) -> tuple[list[str], dict[str, list[str]]]:
    """factor_groups of the study's axes (method.name when the trials have no factors)."""
    group_cols, grid = factor_groups(runs, json.loads(parent_tags.get(AXES, "[]")))
    return group_cols or (["method.name"] if "method.name" in runs.columns else []), grid


def dashboard_html(tracking_uri: str, study: str, trials_dir: Path | None = None) -> str:
    """The dashboard page of a study, read from its MLflow experiment (and the sample previews from its trial
    directories, when given)."""
    runs, history, parent_tags, older = study_frames(tracking_uri, study)
    group_cols, grid = study_groups(runs, parent_tags)
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
        metric = column.split(".", 1)[1]
        pairs = runs[[column, f"measure.{metric}"]] if f"measure.{metric}" in runs else runs[[column]].assign(m="")
        described = {fp: text for fp, text in pairs.dropna(subset=[column]).itertuples(index=False)}
        header[f"{metric} measured as"] = "; ".join(f"{text} [{fp}]" if text else fp for fp, text in described.items())
    present = quality_metrics(runs.columns)
    notes = [
        f"Grouped by {', '.join(c.removeprefix(FACTOR) for c in group_cols) or 'nothing'}"
        f"; seeds ({figures.SEED.removeprefix(FACTOR)}) are averaged.",
        *(METRIC_NOTES[m] for m in present if m in METRIC_NOTES),
    ]
    if len(runs) and (runs["status"] == "diverged").any():
        diverged = runs[runs["status"] == "diverged"]
        notes += [f"diverged: {r.label} — {r.reason}" for r in diverged.itertuples()]
    study_yaml = parent_tags.get(STUDY_YAML, "")
    search = load_search(tracking_uri, study)
    figs = page_blocks(runs, history, group_cols, grid, search, trials_dir)
    if BEST in parent_tags:
        best = json.loads(parent_tags[BEST])
        notes.insert(0, f"Best sample: {best['label']} ({best['trial_id']}), {best['metric']} = {best['value']:.4g}.")
    return render_html(f"orch study: {study}", header, figs, notes, study_yaml)


def build_dashboard(tracking_uri: str, study: str, out_path: Path) -> Path:
    """Write the dashboard HTML atomically; returns its path."""
    atomic_write_bytes(out_path, dashboard_html(tracking_uri, study, out_path.parent / "trials").encode())
    return out_path
