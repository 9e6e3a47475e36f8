"""Pure figure functions: DataFrames in, plotly Figure out.

`runs` has one row per trial (params as dotted columns, the latest value of each metric, `status`); `history` has
trial_id, key, step, value. Groups are the study's grid factors minus the seed; seeds are averaged. Each quality
metric has a direction ("min": lower is better, as KL and FID; "max": higher is), recorded with its runs
(orch.direction.<metric>): best checkpoints, rankings, effects and Pareto fronts follow it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from orch.dashboards.stats import mean_ci, shown
from orch.dashboards.tables import evaluations, formatted
from orch.tracking.schema import (
    FINAL,
    GRAD_NORM,
    TRAIN_LOSS,
    cost_key,
    eval_key,
    parse_target_std_key,
    parse_term_loss_key,
)

SEED = "factor.train.seed"
"""The seed axis's column (dashboards/load.py names factor columns factor.<axis>): averaged, never a group."""
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
DASHES = ["solid", "dash", "dot", "dashdot", "longdash"]
LOG_X_NFE = {"title": "network evaluations (NFE)", "type": "log"}
BETTER = {"min": "lower is better", "max": "higher is better"}


# ---- tables -------------------------------------------------------------------------------------------------


def with_groups(runs: pd.DataFrame, group_cols: list[str]) -> pd.DataFrame:
    """Add the column `group`: the values of group_cols joined by " · ", skipping those a run lacks (a method
    that has no such option)."""
    runs = runs.copy()
    if not group_cols:
        runs["group"] = "all"
        return runs
    present = runs[group_cols].astype(object).where(runs[group_cols].notna(), None)
    runs["group"] = [" · ".join(str(v) for v in row if v is not None) or "all" for row in present.itertuples(False)]
    return runs


def nfe_columns(columns, metric: str) -> list[tuple[int, str]]:
    """(NFE, column) of the unguided in-training evaluations `eval/<metric>/nfe_<N>`, by NFE."""
    return sorted((parsed.nfe, key) for key, parsed in evaluations(columns, metric).items())


def rows_of(history: pd.DataFrame, keep) -> pd.DataFrame:
    """The history rows whose key passes `keep` (a test of one key, run once per distinct key)."""
    return history[history["key"].isin({k for k in history["key"].unique() if keep(str(k))})].copy()


def unguided_evals(history: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The history rows of `eval/<metric>/nfe_<N>` (ω = 1), not those at other guidance scales, with their
    column `nfe`."""
    keys = evaluations(history["key"].unique(), metric)
    rows = history[history["key"].isin(keys)].copy()
    rows["nfe"] = rows["key"].map(lambda k: keys[k].nfe).astype(int)
    return rows


def best_checkpoint(history: pd.DataFrame, metric: str, direction: str = "min") -> pd.DataFrame:
    """trial_id, nfe, best, best_step: each trial's best evaluation per NFE over its whole run (the
    self-distillation paper reports the best checkpoint per step count; selection on the reported metric, so
    read it as an optimistic bound)."""
    evals = unguided_evals(history, metric)
    if evals.empty:
        return pd.DataFrame(columns=["trial_id", "nfe", "best", "best_step"])
    by_trial = evals.groupby(["trial_id", "nfe"])["value"]
    idx = by_trial.idxmin() if direction == "min" else by_trial.idxmax()
    best = evals.loc[idx, ["trial_id", "nfe", "value", "step"]]
    return best.rename(columns={"value": "best", "step": "best_step"}).reset_index(drop=True)


def quality_table(
    runs: pd.DataFrame, history: pd.DataFrame, metric: str, group_cols: list[str], direction: str = "min"
) -> pd.DataFrame:
    """group, nfe, mean, ci, n (completed trials), diverged (count), best (mean of best checkpoints) for
    `eval/<metric>/nfe_N` at the last checkpoint of completed trials."""
    runs = with_groups(runs, group_cols)
    best = best_checkpoint(history, metric, direction)
    rows = []
    for group, trials in runs.groupby("group", sort=True):
        done = trials[trials["status"] == "completed"]
        for nfe, col in nfe_columns(runs.columns, metric):
            mean, ci = mean_ci(done[col].to_numpy(dtype=float))
            best_values = best[(best["nfe"] == nfe) & best["trial_id"].isin(done["trial_id"])]["best"]
            rows.append(
                {
                    "group": group,
                    "nfe": nfe,
                    "mean": mean,
                    "ci": ci,
                    "n": len(done),
                    "diverged": int((trials["status"] == "diverged").sum()),
                    "best": float(best_values.mean()) if len(best_values) else float("nan"),
                }
            )
    return pd.DataFrame(rows, columns=["group", "nfe", "mean", "ci", "n", "diverged", "best"])


def paired_effects(runs: pd.DataFrame, metric: str, axis: str, levels: list, others: list[str]) -> pd.DataFrame:
    """level, nfe, mean, ci, pairs: the change in the metric from the reference level (levels[0]) to each other
    level of `axis`, over pairs of completed trials that agree on every other factor (seed included)."""
    done = runs[runs["status"] == "completed"]
    rows = []
    for nfe, col in nfe_columns(runs.columns, metric):
        table = (
            done.pivot_table(index=others or None, columns=axis, values=col, aggfunc="mean")
            if others
            else (done.groupby(axis)[col].mean().to_frame().T)
        )
        reference = table.get(levels[0])
        for level in levels[1:]:
            if reference is None or level not in table:
                continue
            diff = (table[level] - reference).dropna().to_numpy(dtype=float)
            mean, ci = mean_ci(diff)
            rows.append({"level": level, "nfe": nfe, "mean": mean, "ci": ci, "pairs": len(diff)})
    return pd.DataFrame(rows, columns=["level", "nfe", "mean", "ci", "pairs"])


def pareto_front(points: pd.DataFrame, x: str, y: str, direction: str = "min") -> pd.DataFrame:
    """The points no other point beats on both x (lower is better: a cost) and y (by `direction`), sorted by x."""
    front, best, sign = [], float("inf"), 1 if direction == "min" else -1
    for _, row in points.sort_values([x, y], ascending=[True, direction == "min"]).iterrows():
        if sign * row[y] < best:
            front.append(row)
            best = sign * row[y]
    return pd.DataFrame(front)


# ---- figures ------------------------------------------------------------------------------------------------


def group_styles(runs: pd.DataFrame, group_cols: list[str]) -> dict[str, dict]:
    """Line style per group: colour from the first factor (e.g. method), dash from the second (e.g. stopgrad)."""
    runs = with_groups(runs, group_cols)
    levels = [sorted(runs[c].map(str).unique()) for c in group_cols[:2]]
    styles = {}
    for group, row in runs.drop_duplicates("group").set_index("group").iterrows():
        color = COLORS[levels[0].index(str(row[group_cols[0]])) % len(COLORS)] if group_cols else COLORS[0]
        dash = DASHES[levels[1].index(str(row[group_cols[1]])) % len(DASHES)] if len(group_cols) > 1 else "solid"
        styles[group] = {"color": color, "dash": dash}
    return styles


def quality_vs_nfe(
    runs: pd.DataFrame, history: pd.DataFrame, metric: str, group_cols: list[str], direction: str = "min"
) -> go.Figure:
    """Quality vs sampling steps per group: mean over completed seeds (line), each seed (dots), the mean best
    checkpoint per NFE (open diamonds), diverged trials' last evaluation (crosses), and a 95% Student-t
    interval from 3 seeds on (with 2 it spans ±12.7 standard errors and hides every line)."""
    table = quality_table(runs, history, metric, group_cols, direction)
    grouped = with_groups(runs, group_cols)
    styles = group_styles(runs, group_cols)
    columns = nfe_columns(runs.columns, metric)
    fig = go.Figure()
    for group, rows in table.groupby("group", sort=True):
        n, diverged, style = rows["n"].iloc[0], rows["diverged"].iloc[0], styles[group]
        name = f"{group} (n={n}" + (f", {diverged} diverged)" if diverged else ")")
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
        fig.add_trace(
            go.Scatter(
                x=rows["nfe"],
                y=rows["best"],
                name=group,
                legendgroup=group,
                showlegend=False,
                mode="markers",
                hovertemplate="best checkpoint: %{y:.4g}<extra>%{fullData.name}</extra>",
                marker={"color": style["color"], "symbol": "diamond-open", "size": 9},
            )
        )
        for status, symbol, opacity in (("completed", "circle", 0.45), ("diverged", "x", 1.0)):
            trials = grouped[(grouped["group"] == group) & (grouped["status"] == status)]
            xs = [nfe for nfe, col in columns for v in trials[col] if pd.notna(v)]
            ys = [v for _, col in columns for v in trials[col] if pd.notna(v)]
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    name=f"{group} ({status} seed)",
                    legendgroup=group,
                    showlegend=False,
                    mode="markers",
                    marker={
                        "color": style["color"],
                        "symbol": symbol,
                        "size": 6 if status == "completed" else 10,
                        "opacity": opacity,
                    },
                )
            )
    fig.update_layout(
        title=f"{metric.upper()} vs steps — line: mean over seeds at the last checkpoint; dots: seeds; "
        "◇: best checkpoint; ×: diverged",
        xaxis=LOG_X_NFE | {"tickvals": sorted(table["nfe"].unique())},
        yaxis={"title": f"{metric} ({BETTER[direction]})", "type": "log"},
        legend={"title": " · ".join(shown(c) for c in group_cols)},
        height=600,
    )
    return fig


def fmt(values, digits: int) -> list[str]:
    return [f"{v:.{digits}f}" for v in values]


COST_COLUMNS = {
    cost_key(name): digits
    for name, digits in [("sec_per_kimg", 4), ("fwd_per_sample", 2), ("jvp_per_sample", 2), ("device_hours", 4)]
}


def ranking(
    runs: pd.DataFrame, history: pd.DataFrame, metric: str, group_cols: list[str], direction: str = "min"
) -> pd.DataFrame:
    """One row per group, best first: the metric at the fewest and the most steps (mean and std over completed
    seeds at the last checkpoint, and the seed count) and the measured cost (mean)."""
    table = quality_table(runs, history, metric, group_cols, direction)
    if table.empty:
        return pd.DataFrame()
    nfes = sorted({table["nfe"].min(), table["nfe"].max()})
    grouped = with_groups(runs, group_cols)
    done = grouped[grouped["status"] == "completed"]
    rows = []
    for group, trials in grouped.groupby("group", sort=True):
        row = {"group": group, "seeds": int((trials["status"] == "completed").sum())}
        for nfe in nfes:
            values = done[done["group"] == group][eval_key(metric, nfe)].to_numpy(dtype=float)
            row[f"{metric}@{nfe}"] = float(np.nanmean(values)) if len(values) else float("nan")
            row[f"{metric}@{nfe} std"] = float(np.nanstd(values, ddof=1)) if len(values) > 1 else float("nan")
        row |= {c: float(trials[c].mean()) for c in COST_COLUMNS if c in trials}
        rows.append(row)
    ordered = pd.DataFrame(rows).sort_values(f"{metric}@{nfes[0]}", ascending=direction == "min")
    return ordered.reset_index(drop=True)


def with_spread(means: pd.Series, stds: pd.Series, digits: int) -> list[str]:
    return [f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if np.isfinite(s) else "") for m, s in zip(means, stds)]


def ranking_table(
    runs: pd.DataFrame, history: pd.DataFrame, metric: str, group_cols: list[str], direction: str = "min"
) -> go.Figure:
    """The answer in one table: each group's quality at the fewest and most steps (mean ± std over seeds), and
    its cost."""
    summary = ranking(runs, history, metric, group_cols, direction)
    if summary.empty:
        return go.Figure()
    nfes = [int(c.split("@")[1]) for c in summary.columns if "@" in c and not c.endswith("std")]
    header = ["group", "seeds", *(f"{metric} @ {n} step{'s' if n > 1 else ''}" for n in nfes)]
    header += ["sec/kimg", "fwd/sample", "jvp/sample", "device-hours"]
    cells = [list(summary["group"]), list(summary["seeds"])]
    cells += [with_spread(summary[f"{metric}@{n}"], summary[f"{metric}@{n} std"], 4) for n in nfes]
    cells += [fmt(summary[c], d) if c in summary else ["–"] * len(summary) for c, d in COST_COLUMNS.items()]
    fig = go.Figure(go.Table(header={"values": header, "height": 28}, cells={"values": cells, "height": 24}))
    fig.update_layout(
        title=f"Ranking by {metric} at {nfes[0]} step, {BETTER[direction]} (mean ± std over completed seeds, last "
        "checkpoint)",
        height=150 + 24 * len(summary),
        margin={"t": 60, "b": 10},
    )
    return fig


def factor_effects(runs: pd.DataFrame, metric: str, grid: dict[str, list], direction: str = "min") -> go.Figure:
    """One panel per grid axis: how changing that factor from its first level moves quality at each NFE,
    paired over the other factors (mean ± 95% interval over pairs)."""
    axes = [a for a, levels in grid.items() if a != SEED and len(levels) > 1 and a in runs]
    fig = make_subplots(
        rows=1, cols=max(len(axes), 1), subplot_titles=[f"{shown(a)}: level − {grid[a][0]}" for a in axes]
    )
    for i, axis in enumerate(axes, 1):
        others = [a for a in grid if a != axis and a in runs]
        effects = paired_effects(runs, metric, axis, grid[axis], others)
        for j, (level, rows) in enumerate(effects.groupby("level", sort=False)):
            fig.add_trace(
                go.Scatter(
                    x=rows["nfe"],
                    y=rows["mean"],
                    mode="lines+markers",
                    name=f"{shown(axis)} = {level} (pairs: {rows['pairs'].max()})",
                    error_y={"type": "data", "array": rows["ci"].fillna(0), "visible": True, "thickness": 1},
                    line={"color": COLORS[(j + 3 * i) % len(COLORS)]},
                ),
                1,
                i,
            )
        fig.add_hline(y=0, line={"color": "black", "width": 1}, row=1, col=i)
        fig.update_xaxes(type="log", title="NFE", row=1, col=i)
    better = "< 0" if direction == "min" else "> 0"
    fig.update_yaxes(title=f"Δ {metric} ({better}: better than the first level)", row=1, col=1)
    fig.update_layout(
        title="Factor effects, paired over the other factors (mean ± 95% interval over pairs)", height=450
    )
    return fig


def quality_vs_compute(
    runs: pd.DataFrame, history: pd.DataFrame, metric: str, group_cols: list[str], direction: str = "min"
) -> go.Figure:
    """Quality at the fewest and the most NFE vs device-hours spent training, every evaluation of every group
    (mean over seeds), with the Pareto front: which method is best at equal compute."""
    evals = unguided_evals(history, metric)
    hours = history[history["key"] == cost_key("device_hours")][["trial_id", "step", "value"]].rename(
        columns={"value": "hours"}
    )
    nfes = sorted(set(evals["nfe"]))
    panels = sorted({nfes[0], nfes[-1]}) if nfes else []
    fig = make_subplots(rows=1, cols=max(len(panels), 1), subplot_titles=[f"{n} step{'s' * (n > 1)}" for n in panels])
    groups = with_groups(runs, group_cols)[["trial_id", "group", "status"]]
    styles = group_styles(runs, group_cols)
    for col, nfe in enumerate(panels, 1):
        points = evals[evals["nfe"] == nfe].merge(groups, on="trial_id")
        points = points[points["status"] == "completed"].sort_values("step")
        points = pd.merge_asof(points, hours.sort_values("step"), on="step", by="trial_id", direction="nearest")
        curves = points.groupby(["group", "step"], as_index=False)[["hours", "value"]].mean()
        for group, rows in curves.groupby("group", sort=True):
            fig.add_trace(
                go.Scatter(
                    x=rows["hours"],
                    y=rows["value"],
                    mode="lines+markers",
                    name=group,
                    legendgroup=group,
                    showlegend=col == 1,
                    line={"color": styles[group]["color"], "dash": styles[group]["dash"]},
                ),
                1,
                col,
            )
        front = pareto_front(curves, "hours", "value", direction)
        if len(front):
            fig.add_trace(
                go.Scatter(
                    x=front["hours"],
                    y=front["value"],
                    mode="lines",
                    name="Pareto front",
                    legendgroup="front",
                    showlegend=col == 1,
                    text=front["group"],
                    line={"color": "rgba(0,0,0,0.35)", "width": 8, "shape": "hv"},
                ),
                1,
                col,
            )
        fig.update_xaxes(title="device-hours", type="log", row=1, col=col)
        fig.update_yaxes(title=f"{metric}", type="log", row=1, col=col)
    fig.update_layout(title=f"{metric.upper()} vs training compute (every evaluation; grey: Pareto front)", height=500)
    return fig


def smooth(values: pd.Series, window: int = 5) -> pd.Series:
    """A trailing mean over the last `window` points: no point borrows from the future, and a short run is not
    flattened at its ends."""
    return values.rolling(window, min_periods=1).mean()


def target_std_vs_step(history: pd.DataFrame, runs: pd.DataFrame, group_cols: list[str]) -> go.Figure:
    """Loss-target variance (paper B): batch std of per-sample target norms per term, vs training step. A
    method's diagonal (flow-matching) term is hidden by default beside its main term: click its legend entry to
    show it; flow matching's own curve (its only term) is shown as the reference scale."""
    hist = rows_of(history, lambda k: (parsed := parse_target_std_key(k)) is not None and parsed[1] is None)
    hist = hist.merge(with_groups(runs, group_cols)[["trial_id", "group"]], on="trial_id")
    styles = group_styles(runs, group_cols)
    terms_of = hist.groupby("group")["key"].nunique()
    fig = go.Figure()
    for (group, key), rows in hist.groupby(["group", "key"], sort=True):
        term, _ = parse_target_std_key(key)
        curve = smooth(rows.groupby("step")["value"].mean())
        fig.add_trace(
            go.Scatter(
                x=curve.index,
                y=curve.values,
                name=f"{group} [{term}]",
                mode="lines",
                line={"color": styles[group]["color"], "dash": styles[group]["dash"]},
                visible="legendonly" if term == "diag" and terms_of[group] > 1 else True,
            )
        )
    fig.update_layout(
        title="Loss-target std per term (batch std of per-sample target L2 norms; mean over seeds, smoothed)",
        xaxis={"title": "training step"},
        yaxis={"title": "target std", "type": "log"},
        height=500,
    )
    return fig


def target_std_by_bin(history: pd.DataFrame, runs: pd.DataFrame, group_cols: list[str]) -> go.Figure:
    """Loss-target std per start-time bin over the last quarter of training, per group and term."""
    hist = rows_of(history, lambda k: (parsed := parse_target_std_key(k)) is not None and parsed[1] is not None)
    fig = go.Figure()
    if hist.empty:
        return fig
    late = hist["step"] >= 0.75 * hist.groupby("trial_id")["step"].transform("max")
    hist = hist[late].merge(with_groups(runs, group_cols)[["trial_id", "group"]], on="trial_id")
    hist["term"] = hist["key"].map(lambda k: parse_target_std_key(k)[0])
    hist["bin"] = hist["key"].map(lambda k: parse_target_std_key(k)[1]).astype(int)
    styles = group_styles(runs, group_cols)
    terms_of = hist.groupby("group")["term"].nunique()
    for (group, term), rows in hist.groupby(["group", "term"], sort=True):
        means = rows.groupby("bin")["value"].mean()
        labels = [f"a ∈ [{k / 4:.2f}, {(k + 1) / 4:.2f})" for k in means.index]
        fig.add_trace(
            go.Bar(
                x=labels,
                y=means.values,
                name=f"{group} [{term}]",
                marker={"color": styles[group]["color"]},
                visible="legendonly" if term == "diag" and terms_of[group] > 1 else True,
            )
        )
    fig.update_layout(
        title="Loss-target std by start time a (last quarter of training, mean over seeds)",
        barmode="group",
        yaxis={"title": "target std"},
        height=450,
    )
    return fig


def cost_by_group(runs: pd.DataFrame, group_cols: list[str]) -> go.Figure:
    """Measured training cost per group: time, network evaluations per training sample, and peak memory where it
    is the trial's own (CUDA's max-allocated; on CPU it would be the whole process's resident set, the same for
    every method, so the panel is left out)."""
    sec_per_kimg, fwd, jvp, peak = (
        cost_key(n) for n in ("sec_per_kimg", "fwd_per_sample", "jvp_per_sample", "peak_mem_mb")
    )
    columns = [sec_per_kimg, fwd, jvp]
    if not set(columns) <= set(runs):  # no trial got as far as a log tick (e.g. all failed at start)
        return go.Figure()
    devices = runs["device"].astype(str) if "device" in runs else pd.Series("", index=runs.index)
    on_gpu = runs[devices.str.startswith("cuda")]
    panels = ["sec / kimg (training)", "network evaluations / training sample"]
    panels += ["peak GPU memory (MB)"] if len(on_gpu) and peak in runs else []
    cost = with_groups(runs, group_cols).groupby("group", sort=True)[columns].mean()
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=panels)
    fig.add_trace(go.Bar(x=cost.index, y=cost[sec_per_kimg], showlegend=False), 1, 1)
    fig.add_trace(go.Bar(x=cost.index, y=cost[fwd], name="forward"), 1, 2)
    fig.add_trace(go.Bar(x=cost.index, y=cost[jvp], name="forward+JVP"), 1, 2)
    if len(panels) == 3:
        memory = with_groups(on_gpu, group_cols).groupby("group", sort=True)[peak].mean()
        fig.add_trace(go.Bar(x=memory.index, y=memory.values, showlegend=False), 1, 3)
    fig.update_layout(title="Training cost (measured)", barmode="stack", height=450)
    return fig


def sample_scatter(points: dict[str, dict[int, np.ndarray]]) -> go.Figure:
    """2-D samples per group (rows) and step count (columns): the first seed's last evaluation, as paper A
    shows its checkerboards. `points`: group → NFE → array (n, 2)."""
    groups = list(points)
    nfes = sorted({n for by_nfe in points.values() for n in by_nfe})
    if not groups or not nfes:
        return go.Figure()
    everything = np.concatenate([p for by_nfe in points.values() for p in by_nfe.values()]).ravel()
    lo, hi = np.nanpercentile(everything[np.isfinite(everything)], [0.5, 99.5])  # one square range for all
    fig = make_subplots(
        rows=len(groups),
        cols=len(nfes),
        row_titles=groups,
        column_titles=[f"{n} step{'s' * (n > 1)}" for n in nfes],
        horizontal_spacing=0.01,
        vertical_spacing=0.01,
    )
    for i, group in enumerate(groups, 1):
        for j, nfe in enumerate(nfes, 1):
            xy = points[group].get(nfe)
            if xy is not None:
                fig.add_trace(
                    go.Scatter(x=xy[:, 0], y=xy[:, 1], mode="markers", marker={"size": 2, "color": COLORS[0]},
                               showlegend=False, hoverinfo="skip"),
                    i,
                    j,
                )  # fmt: skip
    fig.update_xaxes(range=[lo, hi], showticklabels=False)
    fig.update_yaxes(range=[lo, hi], showticklabels=False)
    fig.update_annotations(font_size=10)
    fig.update_layout(
        title={"text": "Samples (first seed, last evaluation)", "font": {"size": 14}},
        height=100 + 160 * len(groups),
        width=240 + 160 * len(nfes),
        margin={"l": 20, "r": 220, "t": 80, "b": 20},
    )
    return fig


def training_curves(history: pd.DataFrame, runs: pd.DataFrame, group_cols: list[str]) -> go.Figure:
    """Training loss, per-term raw losses and gradient norm vs step per group (mean over seeds, smoothed)."""
    panels: list[Callable[[str], bool]] = [
        lambda k: k == TRAIN_LOSS,
        lambda k: parse_term_loss_key(k) is not None,
        lambda k: k == GRAD_NORM,
    ]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("total loss", "raw loss per term", "gradient norm"))
    hist = history.merge(with_groups(runs, group_cols)[["trial_id", "group"]], on="trial_id")
    styles = group_styles(runs, group_cols)
    for col, keep in enumerate(panels, 1):
        selected = rows_of(hist, keep)
        for (group, key), rows in selected.groupby(["group", "key"], sort=True):
            curve = smooth(rows.groupby("step")["value"].mean())
            term = f" [{parse_term_loss_key(key)}]" if col == 2 else ""
            fig.add_trace(
                go.Scatter(
                    x=curve.index,
                    y=curve.values,
                    name=group + term,
                    legendgroup=group,
                    showlegend=col == 1,
                    mode="lines",
                    line={"color": styles[group]["color"], "dash": styles[group]["dash"]},
                ),
                1,
                col,
            )
        fig.update_yaxes(type="log", row=1, col=col)
        fig.update_xaxes(title="training step", row=1, col=col)
    fig.update_layout(title="Training curves (mean over seeds, smoothed)", height=450)
    return fig


def search_progress(runs: pd.DataFrame, metric: str, mode: str) -> go.Figure:
    """The searched metric of each sample in the order the samples started, with the best so far."""
    runs = runs.sort_values("start_time").reset_index(drop=True)
    order = np.arange(1, len(runs) + 1)
    values = runs[metric] if metric in runs else pd.Series(np.nan, index=runs.index)
    finished = values.where(runs["status"].isin(["completed", "stopped"]))
    best = finished.cummin() if mode == "min" else finished.cummax()
    fig = go.Figure()
    for i, status in enumerate(sorted(runs["status"].unique())):
        mask = runs["status"] == status
        fig.add_trace(
            go.Scatter(
                x=order[mask],
                y=values[mask],
                mode="markers",
                name=status,
                text=runs["label"][mask],
                marker={
                    "size": 9,
                    "color": COLORS[i % len(COLORS)],
                    "symbol": "circle-open" if status == "stopped" else "circle",
                },
            )
        )
    fig.add_trace(go.Scatter(x=order, y=best, mode="lines", name=f"best so far ({mode})", line={"shape": "hv"}))
    fig.update_layout(
        title=f"Search progress: {metric} of each sample (open: stopped early, last evaluation)",
        xaxis={"title": "sample (in order of start)"},
        yaxis={"title": metric},
        height=450,
    )
    return fig


def search_parameters(runs: pd.DataFrame, metric: str, space: dict[str, dict]) -> go.Figure:
    """Parallel coordinates of the sampled parameters and the metric (log-uniform axes shown as log10)."""
    runs = runs[runs[metric].notna()] if metric in runs else runs.iloc[0:0]
    dimensions = []
    for key, entry in space.items():
        if key not in runs:
            continue
        values = runs[key]
        if entry.get("loguniform"):
            dimensions.append({"label": f"log10 {key}", "values": np.log10(values.astype(float))})
        elif entry.get("choice"):
            levels = sorted(values.map(str).unique())
            dimensions.append(
                {
                    "label": key,
                    "values": values.map(str).map(levels.index),
                    "tickvals": list(range(len(levels))),
                    "ticktext": levels,
                }
            )
        else:
            dimensions.append({"label": key, "values": values.astype(float)})
    dimensions.append({"label": metric, "values": runs[metric] if metric in runs else []})
    fig = go.Figure(
        go.Parcoords(
            line={"color": runs[metric] if metric in runs else [], "colorscale": "Viridis", "showscale": True},
            dimensions=dimensions,
        )
    )
    fig.update_layout(title=f"Sampled parameters vs {metric} (drag along an axis to filter)", height=450)
    return fig


def guidance_columns(columns, metric: str) -> dict[int, list[tuple[float, str]]]:
    """nfe → [(ω, column)] sorted by ω, for the metric's columns at every guidance scale (ω = 1 unsuffixed)."""
    by_nfe: dict[int, list[tuple[float, str]]] = {}
    for c, parsed in evaluations(columns, metric, omega=None).items():
        by_nfe.setdefault(parsed.nfe, []).append((parsed.omega, c))
    return {nfe: sorted(pairs) for nfe, pairs in sorted(by_nfe.items())}


def seed_mean_trace(trials: pd.DataFrame, points: list[tuple[float, str]], group: str, style: dict) -> go.Scatter:
    """One group's line through (x, mean over its trials of column) with 95% interval bars, for (x, column) points."""
    stats_ = [(x, *mean_ci(trials[c].to_numpy(dtype=float))) for x, c in points]
    xs, means, cis = zip(*stats_) if stats_ else ((), (), ())
    return go.Scatter(
        x=xs,
        y=means,
        error_y={"type": "data", "array": cis, "visible": True},
        mode="lines+markers",
        name=group,
        line={"color": style["color"], "dash": style["dash"]},
    )


def quality_vs_guidance(runs: pd.DataFrame, metric: str, group_cols: list[str]) -> go.Figure:
    """The metric vs the guidance scale ω at each NFE (one panel per NFE, one line per group, mean ± 95% interval
    over seeds of completed trials at their last evaluation): the FID–ω curve of guided models. Empty when the
    study measured one scale only."""
    columns = guidance_columns(runs.columns, metric)
    if not any(len(pairs) > 1 for pairs in columns.values()):
        return go.Figure()
    runs = with_groups(runs, group_cols)
    done = runs[runs["status"] == "completed"]
    styles = group_styles(runs, group_cols)
    nfes = list(columns)
    fig = make_subplots(rows=1, cols=len(nfes), subplot_titles=[f"NFE {n}" for n in nfes], shared_yaxes=True)
    for col, nfe in enumerate(nfes, 1):
        for group, trials in done.groupby("group", sort=True):
            trace = seed_mean_trace(trials, columns[nfe], group, styles[group])
            fig.add_trace(trace.update(legendgroup=group, showlegend=col == 1), row=1, col=col)
        fig.update_xaxes(title_text="guidance scale ω", row=1, col=col)
    fig.update_yaxes(title_text=metric, row=1, col=1)
    fig.update_layout(title=f"{metric} vs guidance scale ω at each NFE (mean ± 95% interval over seeds)", height=420)
    return fig


def quality_vs_nfe_at_guidance(runs: pd.DataFrame, metric: str, group_cols: list[str]) -> go.Figure:
    """The metric vs NFE at a guidance scale chosen from a menu (mean ± 95% interval over seeds of completed
    trials at their last evaluation). Empty when the study measured one scale only."""
    columns = guidance_columns(runs.columns, metric)
    omegas = sorted({omega for pairs in columns.values() for omega, _ in pairs})
    if len(omegas) < 2:
        return go.Figure()
    runs = with_groups(runs, group_cols)
    done = runs[runs["status"] == "completed"]
    styles = group_styles(runs, group_cols)
    fig, owner = go.Figure(), []
    for omega in omegas:
        for group, trials in done.groupby("group", sort=True):
            points = [(nfe, c) for nfe, pairs in columns.items() for w, c in pairs if w == omega]
            fig.add_trace(seed_mean_trace(trials, points, group, styles[group]).update(visible=omega == omegas[0]))
            owner.append(omega)
    buttons = [
        {"label": f"ω = {omega:g}", "method": "update", "args": [{"visible": [o == omega for o in owner]}]}
        for omega in omegas
    ]
    fig.update_layout(
        title=f"{metric} vs NFE at the chosen guidance scale (mean ± 95% interval over seeds)",
        xaxis={"title": "network evaluations per sample (NFE)", "type": "log"},
        yaxis={"title": metric},
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "y": 1.15}],
        height=420,
    )
    return fig


# ---- final evaluations (orch eval) ---------------------------------------------------------------------------


def final_runs(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The runs with `orch eval`'s final/<metric>/nfe_<N>[/cfg_<ω>] (means over seed ranges) in place of the
    in-training eval/<metric>/… values, so that the in-training figures draw them."""
    in_training = evaluations(runs.columns, metric, omega=None)
    out = runs[[c for c in runs.columns if c not in in_training]].copy()
    for column, parsed in evaluations(runs.columns, metric, FINAL, omega=None).items():
        out[eval_key(metric, parsed.nfe, parsed.omega)] = runs[column]
    return out


def switchable(views: dict[str, go.Figure], shown: str) -> go.Figure:
    """One figure holding several views' traces, with buttons that switch between them (`shown` first)."""
    fig, spans, start = go.Figure(), {}, 0
    for name, view in views.items():
        fig.add_traces(list(view.data))
        spans[name] = (start, start + len(view.data))
        start += len(view.data)
    fig.update_layout(views[shown].layout)
    buttons = []
    for name, (lo, hi) in spans.items():
        visible = [lo <= i < hi for i in range(start)]
        title = views[name].layout.title.text
        buttons.append({"label": name, "method": "update", "args": [{"visible": visible}, {"title.text": title}]})
    for i, trace in enumerate(fig.data):
        trace.visible = spans[shown][0] <= i < spans[shown][1]
    menu = {"type": "buttons", "direction": "right", "x": 0, "y": 1.01, "yanchor": "bottom", "buttons": buttons}
    fig.update_layout(updatemenus=[menu], margin={"t": 120})  # the buttons sit between the title and the plot
    return fig


def paper_table_figure(table: pd.DataFrame, metric: str, title: str) -> go.Figure:
    """A paper table (dashboards.tables.paper_table) drawn as a Plotly table."""
    if table.empty:
        return go.Figure()
    header, body, _ = formatted(table, metric)
    cells = [list(column) for column in zip(*body)]
    fig = go.Figure(go.Table(header={"values": header, "height": 28}, cells={"values": cells, "height": 24}))
    fig.update_layout(title=title, height=150 + 24 * len(table), margin={"t": 60, "b": 10})
    return fig
