"""Dashboard figures are pure functions of DataFrames: checked on data with known answers, then at scale on a
real MLflow store holding a synthetic 1,000-trial study."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.synthetic_study import synthetic_study
from orch.dashboards import figures
from orch.dashboards.load import load_runs
from orch.dashboards.report import build_figures, comparable_subsets, dashboard_html

GROUPS = ["method.name", "method.stopgrad"]


def toy_runs() -> tuple[pd.DataFrame, pd.DataFrame]:
    """2 methods × 2 stop-gradients × 3 seeds; KL = base(method, seed) + 0.1 for `none`, so the paired effect
    of `none` vs `convex` is exactly +0.1. One extra diverged trial."""
    rows, history = [], []
    for method, base in (("lsd", 0.2), ("psd_mid", 0.4)):
        for stopgrad in ("convex", "none"):
            for seed in range(3):
                trial = f"{method}-{stopgrad}-{seed}"
                value = base + 0.01 * seed + (0.1 if stopgrad == "none" else 0.0)
                rows.append(
                    {
                        "trial_id": trial,
                        "status": "completed",
                        "method.name": method,
                        "method.stopgrad": stopgrad,
                        "train.seed": seed,
                        "eval/kl/nfe_1": value,
                        "eval/kl/nfe_4": value / 2,
                        "cost/sec_per_kimg": base,
                        "cost/fwd_per_sample": 1.0,
                        "cost/jvp_per_sample": 0.25,
                        "cost/peak_mem_mb": 900.0,
                        "cost/device_hours": base,
                    }
                )
                for step, scale in ((100, 2.0), (200, 0.9), (300, 1.0)):  # best checkpoint at step 200
                    history += [
                        (trial, "eval/kl/nfe_1", step, value * scale),
                        (trial, "eval/kl/nfe_4", step, value / 2 * scale),
                        (trial, "cost/device_hours", step, base * step / 300),
                    ]
    rows.append(
        {
            "trial_id": "lsd-convex-bad",
            "status": "diverged",
            "method.name": "lsd",
            "method.stopgrad": "convex",
            "train.seed": 9,
            "eval/kl/nfe_1": 5.0,
            "eval/kl/nfe_4": 5.0,
        }
    )
    return pd.DataFrame(rows), pd.DataFrame(history, columns=["trial_id", "key", "step", "value"])


def test_quality_table_means_intervals_best_checkpoints_and_divergence():
    runs, history = toy_runs()
    table = figures.quality_table(runs, history, "kl", GROUPS).set_index(["group", "nfe"])
    row = table.loc[("lsd · convex", 1)]
    values = np.array([0.20, 0.21, 0.22])
    assert row["mean"] == pytest.approx(values.mean())
    assert row["ci"] == pytest.approx(stats.t.ppf(0.975, 2) * values.std(ddof=1) / math.sqrt(3))
    assert row["n"] == 3 and row["diverged"] == 1  # the diverged trial is counted, not averaged
    assert row["best"] == pytest.approx(0.9 * values.mean())


def test_paired_effect_of_a_factor_is_exact():
    runs, _ = toy_runs()
    effects = figures.paired_effects(runs, "kl", "method.stopgrad", ["convex", "none"], ["method.name", "train.seed"])
    at_one = effects[effects["nfe"] == 1].iloc[0]
    assert at_one["level"] == "none" and at_one["pairs"] == 6
    assert at_one["mean"] == pytest.approx(0.1) and at_one["ci"] == pytest.approx(0.0, abs=1e-12)


def test_pareto_front_keeps_only_undominated_points():
    points = pd.DataFrame({"hours": [1, 2, 3, 4, 5], "value": [0.9, 0.5, 0.7, 0.4, 0.45]})
    front = figures.pareto_front(points, "hours", "value")
    assert list(front["hours"]) == [1, 2, 4]


def test_every_figure_has_data():
    runs, history = toy_runs()
    figs = build_figures(
        runs,
        history,
        GROUPS,
        {"method.name": ["lsd", "psd_mid"], "method.stopgrad": ["convex", "none"], "train.seed": [0, 1, 2]},
    )
    titles = [f.layout.title.text for f in figs]
    for expected in ("Ranking", "KL vs steps", "Factor effects", "training compute", "Training cost"):
        assert any(expected in t for t in titles), (expected, titles)
    assert all(len(f.data) > 0 for f in figs)


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    study_dir = tmp_path_factory.mktemp("synthetic")
    return synthetic_study(study_dir, 1000, points=5)


@pytest.mark.slow
def test_thousand_trial_study_dashboard(synthetic_store):
    runs, history, _ = load_runs(synthetic_store, "synthetic")
    assert len(runs) == 1000 and (runs["status"] == "diverged").sum() == 20
    assert set(history["key"]) >= {"eval/kl/nfe_1", "train/loss", "cost/device_hours", "train/target_std/lsd/bin_3"}
    page = dashboard_html(synthetic_store, "synthetic")
    assert page.count("Plotly.newPlot(") >= 8
    for group in ("lsd · convex", "psd_unif · none", "esd · none"):
        assert json.dumps(group)[1:-1] in page  # as Plotly's JSON writes it


def test_values_with_different_fingerprints_are_never_plotted_together():
    runs, history = toy_runs()
    runs["fingerprint.kl"] = np.where(runs["method.name"] == "lsd", "kl-aaaa", "kl-bbbb")
    subsets = dict(comparable_subsets(runs, "kl"))
    assert set(subsets) == {" [fingerprint kl-aaaa]", " [fingerprint kl-bbbb]"}
    assert set(subsets[" [fingerprint kl-aaaa]"]["method.name"]) == {"lsd"}
    figs = build_figures(runs, history, GROUPS, {})
    assert sum("fingerprint kl-aaaa" in f.layout.title.text for f in figs) >= 2
