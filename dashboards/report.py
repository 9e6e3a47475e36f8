"""Assemble the study dashboard: one self-contained HTML file (plotly.js inlined, works offline)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from dashboards import figures
from dashboards.load import load_runs

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


def build_figures(runs, history, group_cols: list[str]) -> list[go.Figure]:
    figs = []
    for metric in quality_metrics(runs.columns):
        figs += [figures.ranking_table(runs, metric, group_cols), figures.quality_vs_nfe(runs, metric, group_cols)]
    figs += [
        figures.target_std_vs_step(history, runs, group_cols),
        figures.cost_by_group(runs, group_cols),
        figures.training_curves(history, runs, group_cols),
    ]
    return figs


def render_html(title: str, header: dict[str, str], figs: list[go.Figure], notes: list[str]) -> str:
    meta = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in header.items())
    divs = "\n".join(f'<div class="figure">{f.to_html(full_html=False, include_plotlyjs=False)}</div>' for f in figs)
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>body{{font-family:sans-serif;margin:24px;max-width:1200px}} th{{text-align:left;padding-right:12px}}
.figure{{margin:24px 0;border-top:1px solid #ddd}}</style></head>
<body><h1>{html.escape(title)}</h1><table>{meta}</table><ul>{notes_html}</ul>
{divs}
</body></html>
"""


def build_dashboard(tracking_uri: str, study: str, out_path: Path) -> Path:
    """Read the study's runs and write the dashboard HTML atomically; returns its path."""
    runs, history, parent_tags = load_runs(tracking_uri, study)
    axes = json.loads(parent_tags.get("orch.axes", "[]"))
    group_cols = [a for a in axes if a != figures.SEED and a in runs.columns] or (
        ["method.name"] if "method.name" in runs.columns else []
    )
    header = {"study": study, "trials": str(len(runs))}
    if len(runs):
        header |= {f"trials {s}": str(n) for s, n in runs["status"].value_counts().items()}
    header |= {label: parent_tags[tag] for tag, label in HEADER_TAGS.items() if tag in parent_tags}
    for column, title in (("git_commit", "trials ran at commit"), ("device", "trials ran on")):
        if column in runs.columns:  # each trial records its own; a study resumed across commits shows them all
            header[title] = ", ".join(sorted(runs[column].dropna().astype(str).unique())) or "unknown"
    notes = [
        f"Grouped by {', '.join(group_cols) or 'nothing'}; seeds ({figures.SEED}) are averaged.",
        "KL = KL(data ‖ model) on a 50×50 histogram with exact target cell masses; lower is better.",
    ]
    if len(runs) and (runs["status"] == "diverged").any():
        diverged = runs[runs["status"] == "diverged"]
        notes += [f"diverged: {r.label} — {r.reason}" for r in diverged.itertuples()]
    page = render_html(f"orch study: {study}", header, build_figures(runs, history, group_cols), notes)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(page)
    tmp.replace(out_path)
    return out_path
