"""`orch table`: a study's ranking as a paper table — one row per group (method × ablation level), the metric at
each NFE (mean ± spread over completed seeds) and the measured cost — in Markdown, LaTeX or CSV."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd

from orch.dashboards.stats import mean_ci, shown
from orch.tracking.schema import EVAL, FINAL, EvalKey, cost_key, parse_eval_key, series_key

COSTS = {
    cost_key("sec_per_kimg"): ("sec/kimg", 4),
    cost_key("fwd_per_sample"): ("fwd/sample", 2),
    cost_key("jvp_per_sample"): ("JVP/sample", 2),
}
NAMES = {"kl": "KL", "kl_cond": "class KL", "fid": "FID", "kid": "KID", "is": "IS"}


def column_title(group_col: str) -> str:
    """factor.method.stopgrad → stopgrad, factor.method.name → method."""
    parts = shown(group_col).split(".")
    return parts[0] if parts[-1] == "name" else parts[-1]


def spread_of(values: np.ndarray, how: str) -> float:
    """Half the range, the sample standard deviation, or the 95% Student-t half-width over seeds (NaN below two
    values: nothing to spread)."""
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return float("nan")
    if how == "half-range":
        return float((values.max() - values.min()) / 2)
    if how == "std":
        return float(values.std(ddof=1))
    return mean_ci(values)[1]


def evaluations(keys, metric: str, source: str = EVAL, omega: float | None = 1.0) -> dict[str, EvalKey]:
    """The keys (column names, history keys) that hold values of `metric` from `source` (eval: in training,
    final: `orch eval`'s means) at guidance scale ω (None: at any), parsed; never a seed range's value or a
    spread."""
    found = {}
    for key in keys:
        parsed = parse_eval_key(key)
        if parsed and (parsed.source, parsed.metric, parsed.rest) == (source, metric, ""):
            if omega is None or parsed.omega == omega:
                found[key] = parsed
    return found


def nfe_values(runs: pd.DataFrame, metric: str, source: str, omega: float) -> list[tuple[int, str]]:
    """(NFE, column) of `source/<metric>/nfe_<N>[/cfg_<ω>]` present in the runs, by NFE."""
    return sorted((parsed.nfe, key) for key, parsed in evaluations(runs.columns, metric, source, omega).items())


def final_values(runs: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, dict | None, list[str]]:
    """The runs with only those `final/<metric>/…` values measured under the commonest protocol (each trial's
    tag orch.final.<metric> says which protocol each series was measured under; values measured differently are
    never shown together), that protocol (measured_as, num_samples, checkpoint, seeds, dataset) or None, and a
    note for each other protocol. Trials without such a value are left out."""
    column = f"final.{metric}"
    records = runs[column].map(lambda v: json.loads(v) if isinstance(v, str) else {}) if column in runs else None
    counts = Counter(fp for r in records for fp in r.get("series", {}).values()) if records is not None else None
    if not counts:
        return runs.iloc[0:0], None, []
    chosen = counts.most_common(1)[0][0]
    protocols = {fp: p for r in records for fp, p in r.get("protocols", {}).items()}
    notes = [
        f"final {metric}: {n} value(s) not shown, measured as {protocols[fp]['measured_as']}"
        for fp, n in counts.most_common()[1:]
    ]
    out = runs.copy()
    for row, record in records.items():
        for suffix, fp in record.get("series", {}).items():
            if fp != chosen and series_key(metric, suffix) in out:
                out.loc[row, series_key(metric, suffix)] = np.nan
    keep = list(evaluations(out.columns, metric, FINAL, None))
    return out[out[keep].notna().any(axis=1)], protocols[chosen], notes


def paper_table(
    runs: pd.DataFrame,
    metric: str,
    group_cols: list[str],
    direction: str = "min",
    source: str = "eval",
    omega: float = 1.0,
    spread: str = "half-range",
) -> pd.DataFrame:
    """One row per group of completed trials, best at the fewest NFE first: the group's factor levels, then per
    NFE `<metric>@<N>` (mean over seeds) and `<metric>@<N> spread`, `seeds`, and the mean cost per sample.
    source "eval": the last in-training evaluation; "final": `orch eval`'s (the mean over its seed ranges)."""
    columns = nfe_values(runs, metric, source, omega)
    done = runs[runs["status"] == "completed"]
    if not columns or done.empty:
        return pd.DataFrame()
    rows = []
    keys = [c for c in group_cols if c in done]
    for levels, trials in done.groupby(keys, sort=False, dropna=False) if keys else [((), done)]:
        levels = levels if isinstance(levels, tuple) else (levels,)
        row = {column_title(c): ("–" if pd.isna(v) else v) for c, v in zip(keys, levels)}
        row["seeds"] = int(trials[[c for _, c in columns]].notna().any(axis=1).sum())
        for nfe, column in columns:
            values = trials[column].to_numpy(dtype=float)
            row[f"{metric}@{nfe}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
            row[f"{metric}@{nfe} spread"] = spread_of(values, spread)
        row |= {title: float(trials[c].mean()) for c, (title, _) in COSTS.items() if c in trials}
        if any(np.isfinite(row[f"{metric}@{nfe}"]) for nfe, _ in columns):  # groups without values are left out
            rows.append(row)
    if not rows:
        return pd.DataFrame()
    first = f"{metric}@{columns[0][0]}"
    return pd.DataFrame(rows).sort_values(first, ascending=direction == "min", kind="stable").reset_index(drop=True)


def formatted(table: pd.DataFrame, metric: str, digits: int = 3) -> tuple[list[str], list[list[str]], int]:
    """(header, rows of cells, how many leading columns are factor levels) of a paper table as printed: the
    metric as `mean ± spread` per NFE (no ± below two seeds), then the cost per sample."""
    nfes = [c.split("@")[1] for c in table.columns if "@" in c and not c.endswith("spread")]
    levels = [c for c in table.columns if "@" not in c and c != "seeds" and c not in {t for t, _ in COSTS.values()}]
    costs = [(t, d) for t, d in COSTS.values() if t in table]
    name = NAMES.get(metric, metric)
    header = levels + [f"{name} @{nfes[0]}", *(f"@{n}" for n in nfes[1:])] + [t for t, _ in costs]
    body = []
    for row in table.to_dict("records"):
        cells = [str(row[c]) for c in levels]
        for n in nfes:
            mean, spread = row[f"{metric}@{n}"], row[f"{metric}@{n} spread"]
            shown = f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if np.isfinite(spread) else "")
            cells.append(shown if np.isfinite(mean) else "–")
        cells += [f"{row[t]:.{d}f}" for t, d in costs]
        body.append(cells)
    return header, body, len(levels)


def render(table: pd.DataFrame, metric: str, fmt: str, digits: int = 3) -> str:
    """The table as Markdown (the layout of the README's table), LaTeX (booktabs) or CSV (every number unrounded)."""
    if fmt == "csv":
        return table.to_csv(index=False)
    header, body, levels = formatted(table, metric, digits)
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body]) + "\n"
    escape = lambda text: text.replace("_", r"\_").replace("±", r"$\pm$")  # noqa: E731
    lines = [r"\begin{tabular}{" + "l" * levels + "r" * (len(header) - levels) + "}", r"\toprule"]
    lines += [" & ".join(escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(escape(c) for c in cells) + r" \\" for cells in body]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"
