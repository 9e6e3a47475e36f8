"""The answer right, complete and reachable: dashboard groups that never merge different configurations, trial
identity that an evaluation change leaves alone, and a resubmission that evaluates what is missing."""

import json
import warnings
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from orch.cli import main
from orch.dashboards import figures
from orch.dashboards.load import load_runs
from orch.dashboards.report import factor_groups
from orch.study.load import load_study, parse_study
from tests.conftest import STUDIES

ROOT = Path(__file__).resolve().parent.parent


def groups_of(uri: str, study: str) -> dict[str, list[str]]:
    """Dashboard group → the trial ids in it."""
    runs, _, parent = load_runs(uri, study)
    group_cols, _ = factor_groups(runs, json.loads(parent.get("orch.axes", "[]")))
    grouped = figures.with_groups(runs, group_cols)
    return {g: sorted(rows["trial_id"]) for g, rows in grouped.groupby("group")}


def tiny_variant(tmp_path: Path, name: str, **changes) -> Path:
    """tests/studies/tiny.yaml under another name with dotted keys of its base (or its grid) replaced."""
    study = yaml.safe_load((STUDIES / "tiny.yaml").read_text()) | {"name": name}
    for key, value in changes.items():
        section, rest = key.split(".", 1) if key != "grid" else (key, None)
        if rest is None:
            study["grid"] = value
        else:
            study["base"].setdefault(section, {})[rest] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_levels_that_name_different_option_sets_are_different_groups(tmp_path):
    """Two time samplers that differ only in options the first leaves at their defaults, two MeanFlow variants:
    four groups of one trial each, never one group averaged over different configurations."""
    grid = {
        "time_sampler": [{"name": "logit_normal"}, {"name": "logit_normal", "mean": 0.0, "std": 1.0}],
        "method": [{"name": "meanflow"}, {"name": "meanflow", "adaptive_p": 0.0}],
    }
    path = tiny_variant(tmp_path, "levels", grid=grid, **{"train.steps": 20, "eval.every": 20})
    assert main(["submit", str(path), "--workdir", str(tmp_path), "--backend", "local"]) == 0
    groups = groups_of(f"sqlite:///{tmp_path / 'levels' / 'mlflow.db'}", "levels")
    assert len(groups) == 4 and all(len(ids) == 1 for ids in groups.values()), groups
    assert "meanflow adaptive_p=0.0 · logit_normal" in groups
    assert "meanflow · logit_normal mean=0.0 std=1.0" in groups


def test_an_evaluation_change_keeps_the_trial_and_its_identity():
    study = load_study(STUDIES / "tiny.yaml")
    changed = parse_study(
        (STUDIES / "tiny.yaml")
        .read_text()
        .replace("nfe: [1, 2]", "nfe: [1, 2, 4]")
        .replace("log_every: 10", "log_every: 5"),
        "tiny.yaml",
    )
    assert [t.id for t in changed.trials] == [t.id for t in study.trials]
    retrained = parse_study((STUDIES / "tiny.yaml").read_text().replace("steps: 60", "steps: 61"), "tiny.yaml")
    assert not {t.id for t in retrained.trials} & {t.id for t in study.trials}


def test_grid_levels_that_differ_only_in_evaluation_are_refused():
    text = "name: s\ngrid: {eval.num_samples: [1000, 2000]}\n"
    from orch.problems import StudyError

    try:
        parse_study(text, "s.yaml")
    except StudyError as e:
        assert "train the same trial" in e.report() and "grid.eval.num_samples" in e.report()
    else:
        raise AssertionError("a grid over evaluation settings must be refused")


def test_resubmitting_with_one_more_step_count_trains_nothing_and_adds_its_metrics(tmp_path, capsys):
    first = tiny_variant(tmp_path, "more_nfe")
    assert main(["submit", str(first), "--workdir", str(tmp_path), "--backend", "local"]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'more_nfe' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("more_nfe")
    runs = client.search_runs([experiment.experiment_id], "tags.`orch.role` = 'trial'")
    losses = {r.info.run_id: client.get_metric_history(r.info.run_id, "train/loss") for r in runs}
    capsys.readouterr()

    more = tiny_variant(tmp_path, "more_nfe", **{"eval.nfe": [1, 2, 4]})
    assert main(["submit", str(more), "--workdir", str(tmp_path), "--backend", "local"]) == 0
    out = capsys.readouterr().out
    assert "4 already finished, 0 to run (4 of them finished, to evaluate" in out
    for run in client.search_runs([experiment.experiment_id], "tags.`orch.role` = 'trial'"):
        assert client.get_metric_history(run.info.run_id, "train/loss") == losses[run.info.run_id]  # no training
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/kl/nfe_4")] == [60]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/kl/nfe_1")] == [30, 60]
    capsys.readouterr()

    again = tiny_variant(tmp_path, "more_nfe", **{"eval.nfe": [1, 2, 4], "eval.num_samples": 3000})
    assert main(["submit", str(again), "--workdir", str(tmp_path), "--backend", "local"]) == 0
    out = capsys.readouterr().out
    assert "4 already finished, 0 to run on" in out and "evaluated with other settings of kl" in out


ONE_PASS = """name: onepass
base:
  dataset: {name: checkerboard}
  time_sampler: {name: unifrom}
  eval: {metrics: [fid]}
grid:
  method.nmae: [lsd, esd]
exclude:
  - {method.name: lsd}
profiles:
  smoke: {train.stepz: 10}
  other: {eval.nfee: [1]}
"""


def test_every_problem_is_reported_in_one_pass_at_the_line_where_it_is_written(tmp_path, capsys):
    path = tmp_path / "onepass.yaml"
    path.write_text(ONE_PASS)
    assert run(["validate", str(path), "--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    for expected in (
        "exclude.0.method.name (line 9): not a grid axis",
        "grid.method.nmae (line 7): unknown key 'nmae'",
        "time_sampler.name (line 4): unknown time sampler 'unifrom'",
        "profiles.smoke.train.stepz (line 11): unknown key 'stepz'",  # the profile's line, not the base's
        "eval.metrics.0 (line 5): fid needs a dataset with images",
        "profiles.other.eval.nfee (line 12): unknown key 'nfee'",  # a profile that is not run is checked too
    ):
        assert expected in err, (expected, err)
    assert "6 problem(s)" in err


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_command_line_overrides_set_values_and_axes_and_are_recorded(tmp_path, capsys):
    argv = ["plan", str(STUDIES / "tiny.yaml"), "train.steps=20", "method.name=[lsd]", "eval.nfe=[1, 4]"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "2 trial(s)" in out and "psd_mid" not in out  # the axis replaced by a list: lsd × 2 seeds
    argv = ["submit", str(STUDIES / "tiny.yaml"), "train.steps=20", "method.name=[lsd]", "train.seed=[0]"]
    assert run([*argv, "--workdir", str(tmp_path), "--backend", "local"]) == 0
    recorded = yaml.safe_load((tmp_path / "tiny" / "study.yaml").read_text())
    assert recorded["base"]["train"]["steps"] == 20 and recorded["grid"] == {"method.name": ["lsd"], "train.seed": [0]}
    capsys.readouterr()
    assert run(["validate", str(STUDIES / "tiny.yaml"), "train.lr=.inf", "oops"]) == 2
    assert "oops: an override is KEY=VALUE" in capsys.readouterr().err
    assert run(["validate", str(STUDIES / "tiny.yaml"), "train.lr=.inf"]) == 2
    assert "(set on the command line)" in capsys.readouterr().err


def test_version_and_a_default_workdir_from_the_environment(tmp_path, monkeypatch, capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.startswith("orch ")
    monkeypatch.setenv("ORCH_WORKDIR", str(tmp_path / "studies"))
    assert run(["status", "missing"]) == 2
    assert f"under {tmp_path / 'studies'}/ ($ORCH_WORKDIR)" in capsys.readouterr().err
    assert run(["-q", "submit", str(STUDIES / "tiny.yaml"), "train.steps=10", "--backend", "local"]) == 0
    out = capsys.readouterr().out
    assert "started" not in out and "done in" in out  # -q: the summary, no progress lines
    assert run(["status", "tiny"]) == 0 and "4 completed" in capsys.readouterr().out


def test_status_shows_the_current_study_by_default_and_prune_archives_earlier_trials(tmp_path, capsys):
    workdir = ["--workdir", str(tmp_path), "--backend", "local"]
    assert run(["submit", str(STUDIES / "tiny.yaml"), "train.steps=10", *workdir]) == 0
    capsys.readouterr()
    fewer = ["submit", str(STUDIES / "tiny.yaml"), "train.steps=10", "method.name=[lsd]", *workdir]
    assert run(fewer) == 2  # another grid under the same name: refused, naming the difference
    err = capsys.readouterr().err
    assert "grid.method.name: ['lsd', 'psd_mid'] → ['lsd']: 2 trial(s), 2 of them among the 4" in err, err
    assert run([*fewer, "--new-version"]) == 0
    capsys.readouterr()
    assert run(["status", "tiny", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 completed" in out and "2 trial(s) of earlier versions of the study not shown" in out
    assert run(["status", "tiny", "--workdir", str(tmp_path), "--all"]) == 0
    assert capsys.readouterr().out.count("[earlier version of the study]") == 2
    page = (tmp_path / "tiny" / "dashboard.html").read_text()
    assert "trials of earlier versions (not shown)" in page
    assert run(["prune", "tiny", "--workdir", str(tmp_path)]) == 0
    assert "archived 2 trial(s)" in capsys.readouterr().out
    assert len(list((tmp_path / "tiny" / "archive").iterdir())) == 2
    assert run(["status", "tiny", "--workdir", str(tmp_path), "--all"]) == 0
    assert "2 completed" in capsys.readouterr().out


def test_a_new_version_shows_only_its_own_step_counts_and_the_original_again_its_own_names(tmp_path, capsys):
    """v1 (two methods, NFE 1 and 2), then v2 (another method, NFE 1 only), then v1 again: each version's
    dashboard and table show its own methods and step counts, with no empty column and no warning."""
    tiny, workdir = str(STUDIES / "tiny.yaml"), ["--workdir", str(tmp_path), "--backend", "local"]
    table = ["table", "tiny", "--workdir", str(tmp_path)]
    assert run(["submit", tiny, "train.steps=10", *workdir]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "Mean of empty slice" of a column no trial has
        assert run(["submit", tiny, "train.steps=10", "method.name=[meanflow]", "eval.nfe=[1]", "--new-version",
                    *workdir]) == 0  # fmt: skip
        capsys.readouterr()
        assert run(table) == 0
        assert capsys.readouterr().out.splitlines()[0] == "| method | KL @1 | sec/kimg | fwd/sample | JVP/sample |"
        page = (tmp_path / "tiny" / "dashboard.html").read_text()
        assert "kl @ 1 step" in page and "kl @ 2 steps" not in page
        assert run(["submit", tiny, "train.steps=10", "--new-version", *workdir]) == 0
        capsys.readouterr()
        for fmt in ("markdown", "latex"):
            assert run([*table, "--format", fmt]) == 0
            rows = capsys.readouterr().out
            assert "lsd" in rows and "psd" in rows and "meanflow" not in rows and "–" not in rows and "@2" in rows


def test_status_tells_a_dead_driver_from_a_live_one(tmp_path, capsys):
    """`orch submit … | head -3` kills orch with a closed pipe: its trial stays `running` with no process."""
    assert run(["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(tmp_path), "--backend", "local"]) == 0
    trial_dir = next((tmp_path / "tiny" / "trials").iterdir())
    state = json.loads((trial_dir / "state.json").read_text()) | {"status": "running"}
    (trial_dir / "state.json").write_text(json.dumps(state))  # as a driver killed mid-trial leaves it
    capsys.readouterr()
    assert run(["status", "tiny", "--workdir", str(tmp_path)]) == 0
    assert "no live orch process runs it: `orch resume` continues it" in capsys.readouterr().out


def test_runs_follow_mlflow_conventions(tmp_path):
    """A classic training experiment, the UI's source, user and commit columns filled, the dataset as an input,
    the best checkpoints reachable from the run; and the dashboard's fast history read equals MLflow's public
    API."""
    from orch.dashboards.load import metric_histories

    assert run(["submit", str(STUDIES / "tiny.yaml"), "--workdir", str(tmp_path), "--backend", "local"]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'tiny' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id], "tags.`orch.role` = 'trial'")
    for r in runs:
        tags = r.data.tags
        assert tags["mlflow.source.name"].startswith("orch submit") and tags["mlflow.user"]
        assert len(tags["mlflow.source.git.commit"]) == 40
        (dataset,) = r.inputs.dataset_inputs
        assert dataset.dataset.name == "checkerboard" and json.loads(dataset.dataset.source)["name"] == "checkerboard"
        assert [a.path for a in client.list_artifacts(r.info.run_id, "best")] == ["best/best.json"]
        assert (Path(tags["orch.trial_dir"]) / "best" / "best.json").is_file()
    ids, keys = [r.info.run_id for r in runs], ["train/loss", "eval/kl/nfe_1"]
    fast, public = (metric_histories(client, ids, keys, fast=f) for f in (True, False))
    order = ["run_id", "key", "step"]
    assert len(fast) == 4 * (6 + 2) and fast.sort_values(order).reset_index(drop=True).equals(
        public.sort_values(order).reset_index(drop=True)
    )
