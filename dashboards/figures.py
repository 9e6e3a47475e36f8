"""Pure figure functions: DataFrame in, plotly Figure out. Groups are the study's grid factors minus the seed."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from scipy import stats

SEED = "train.seed"
NFE_KEY = re.compile(r"^eval/(?P<metric>[a-z0-9_]+)/nfe_(?P<nfe>\d+)$")


def group_label(row: pd.Series, group_cols: list[str]) -> str:
    return " · ".join(f"{row[c]}" for c in group_cols) if group_cols else "all"


def with_groups(runs: pd.DataFrame, group_cols: list[str]) -> pd.DataFrame:
    runs = runs.copy()
    runs["group"] = runs.apply(group_label, axis=1, group_cols=group_cols) if len(runs) else []
    return runs


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for a single value)."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) == 1:
        return float(values[0]), 0.0
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(half)


def quality_table(runs: pd.DataFrame, metric: str, group_cols: list[str]) -> pd.DataFrame:
    """Long table: group, nfe, mean, ci, n (completed trials), diverged (count) for `eval/<metric>/nfe_N`."""
    runs = with_groups(runs, group_cols)
    columns = [(int(m["nfe"]), c) for c in runs.columns if (m := NFE_KEY.match(c)) and m["metric"] == metric]
    rows = []
    for group, trials in runs.groupby("group", sort=True):
        done = trials[trials["status"] == "completed"]
        for nfe, col in sorted(columns):
            mean, ci = mean_ci(done[col].to_numpy(dtype=float))
            rows.append(
                {
                    "group": group,
                    "nfe": nfe,
                    "mean": mean,
                    "ci": ci,
                    "n": len(done),
                    "diverged": int((trials["status"] == "diverged").sum()),
                }
            )
    return pd.DataFrame(rows, columns=["group", "nfe", "mean", "ci", "n", "diverged"])


COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
DASHES = ["solid", "dash", "dot", "dashdot", "longdash"]


def group_styles(runs: pd.DataFrame, group_cols: list[str]) -> dict[str, dict]:
    """Line style per group: colour from the first factor (e.g. method), dash from the second (e.g. stopgrad)."""
    runs = with_groups(runs, group_cols)
    levels = [sorted(runs[c].astype(str).unique()) for c in group_cols[:2]]
    styles = {}
    for group, row in runs.drop_duplicates("group").set_index("group").iterrows():
        color = COLORS[levels[0].index(str(row[group_cols[0]])) % len(COLORS)] if group_cols else COLORS[0]
        dash = DASHES[levels[1].index(str(row[group_cols[1]])) % len(DASHES)] if len(group_cols) > 1 else "solid"
        styles[group] = {"color": color, "dash": dash}
    return styles


def quality_vs_nfe(runs: pd.DataFrame, metric: str, group_cols: list[str]) -> go.Figure:
    """Quality vs sampling steps, one line per group: the mean over seeds, each seed as a dot, and a 95%
    Student-t interval once there are 3 or more seeds (with 2 it spans ±12.7 s.e. and hides every line)."""
    table = quality_table(runs, metric, group_cols)
    seeds = with_groups(runs, group_cols)
    seeds = seeds[seeds["status"] == "completed"]
    styles = group_styles(runs, group_cols)
    fig = go.Figure()
    for group, rows in table.groupby("group", sort=True):
        n, diverged = rows["n"].iloc[0], rows["diverged"].iloc[0]
        name = f"{group} (n={n}" + (f", {diverged} diverged)" if diverged else ")")
        style = styles[group]
        error = {"type": "data", "array": rows["ci"], "visible": True, "thickness": 1} if n >= 3 else None
        fig.add_trace(
            go.Scatter(
                x=rows["nfe"],
                y=rows["mean"],
                name=name,
                legendgroup=group,
                mode="lines+markers",
                line={"color": style["color"], "dash": style["dash"], "width": 2},
                error_y=error,
            )
        )
        points = seeds[seeds["group"] == group]
        xs = [nfe for nfe in rows["nfe"] for _ in range(len(points))]
        ys = [v for nfe in rows["nfe"] for v in points[f"eval/{metric}/nfe_{nfe}"]]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                legendgroup=group,
                showlegend=False,
                mode="markers",
                hoverinfo="y+name",
                name=group,
                marker={"color": style["color"], "size": 5, "opacity": 0.5},
            )
        )
    fig.update_layout(
        title=f"{metric.upper()} vs steps (EMA weights, last checkpoint): line = mean over seeds, dots = seeds",
        xaxis={"title": "network evaluations (NFE)", "type": "log", "tickvals": sorted(table["nfe"].unique())},
        yaxis={"title": f"{metric} (lower is better)", "type": "log"},
        legend={"title": " · ".join(group_cols)},
        height=600,
    )
    return fig


def smooth(values: pd.Series, window: int = 5) -> pd.Series:
    return values.rolling(window, min_periods=1, center=True).mean()


def fmt(values, digits: int) -> list[str]:
    return [f"{v:.{digits}f}" for v in values]


def ranking_table(runs: pd.DataFrame, metric: str, group_cols: list[str]) -> go.Figure:
    """The answer in one table: each group's quality at the fewest and most steps, and its cost."""
    table = quality_table(runs, metric, group_cols)
    if table.empty:
        return go.Figure()
    nfes = sorted({table["nfe"].min(), table["nfe"].max()})
    pivot = table.pivot(index="group", columns="nfe", values="mean")
    cost_cols = ["cost/sec_per_kimg", "cost/fwd_per_sample", "cost/jvp_per_sample"]
    cost = with_groups(runs, group_cols).groupby("group")[cost_cols].mean()
    summary = pivot[nfes].join(cost).sort_values(nfes[0])
    header = [
        "group",
        *(f"{metric} @ {n} step{'s' if n > 1 else ''}" for n in nfes),
        "sec/kimg",
        "fwd/sample",
        "jvp/sample",
    ]
    cells = [
        list(summary.index),
        *(fmt(summary[n], 4) for n in nfes),
        fmt(summary[cost_cols[0]], 4),
        fmt(summary[cost_cols[1]], 2),
        fmt(summary[cost_cols[2]], 2),
    ]
    fig = go.Figure(go.Table(header={"values": header, "height": 28}, cells={"values": cells, "height": 24}))
    fig.update_layout(
        title=f"Ranking by {metric} at {nfes[0]} step (mean over completed seeds)", height=120 + 28 * len(summary)
    )
    return fig


def target_std_vs_step(history: pd.DataFrame, runs: pd.DataFrame, group_cols: list[str]) -> go.Figure:
    """Loss-target variance (paper B): batch std of per-sample target norms per term, vs training step. The
    diagonal (flow-matching) term is hidden by default: click its legend entry to show it."""
    hist = history[history["key"].str.match(r"^train/target_std/[^/]+$")]
    hist = hist.merge(with_groups(runs, group_cols)[["trial_id", "group"]], on="trial_id")
    styles = group_styles(runs, group_cols)
    fig = go.Figure()
    for (group, key), rows in hist.groupby(["group", "key"], sort=True):
        term = key.rsplit("/", 1)[-1]
        curve = smooth(rows.groupby("step")["value"].mean())
        fig.add_trace(
            go.Scatter(
                x=curve.index,
                y=curve.values,
                name=f"{group} [{term}]",
                mode="lines",
                line={"color": styles[group]["color"], "dash": styles[group]["dash"]},
                visible="legendonly" if term == "diag" else True,
            )
        )
    fig.update_layout(
        title="Loss-target std per term (batch std of per-sample target L2 norms; mean over seeds, smoothed)",
        xaxis={"title": "training step"},
        yaxis={"title": "target std", "type": "log"},
        height=500,
    )
    return fig


def cost_by_group(runs: pd.DataFrame, group_cols: list[str]) -> go.Figure:
    """Measured training cost per group: time, peak memory, network evaluations per training sample."""
    runs = with_groups(runs, group_cols)
    cost = runs.groupby("group", sort=True)[
        ["cost/sec_per_kimg", "cost/peak_mem_mb", "cost/fwd_per_sample", "cost/jvp_per_sample"]
    ].mean()
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=("sec / kimg (training)", "peak memory (MB)", "network evaluations / training sample"),
    )
    fig.add_trace(go.Bar(x=cost.index, y=cost["cost/sec_per_kimg"], showlegend=False), 1, 1)
    fig.add_trace(go.Bar(x=cost.index, y=cost["cost/peak_mem_mb"], showlegend=False), 1, 2)
    fig.add_trace(go.Bar(x=cost.index, y=cost["cost/fwd_per_sample"], name="forward"), 1, 3)
    fig.add_trace(go.Bar(x=cost.index, y=cost["cost/jvp_per_sample"], name="forward+JVP"), 1, 3)
    fig.update_layout(title="Training cost (measured)", barmode="stack", height=450)
    return fig


def training_curves(history: pd.DataFrame, runs: pd.DataFrame, group_cols: list[str]) -> go.Figure:
    """Total training loss vs step per group (mean over seeds, smoothed)."""
    hist = history[history["key"] == "train/loss"]
    hist = hist.merge(with_groups(runs, group_cols)[["trial_id", "group"]], on="trial_id")
    styles = group_styles(runs, group_cols)
    fig = go.Figure()
    for group, rows in hist.groupby("group", sort=True):
        curve = smooth(rows.groupby("step")["value"].mean())
        fig.add_trace(
            go.Scatter(
                x=curve.index,
                y=curve.values,
                name=group,
                mode="lines",
                line={"color": styles[group]["color"], "dash": styles[group]["dash"]},
            )
        )
    fig.update_layout(
        title="Training loss (mean over seeds, smoothed)",
        xaxis={"title": "training step"},
        yaxis={"title": "loss", "type": "log"},
        height=450,
    )
    return fig
