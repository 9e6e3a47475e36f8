"""Evaluation after training (`orch eval`), sample export (`orch sample`), paper tables (`orch table`) and the
published numbers, on real submissions (local backend, sqlite MLflow) and torch-fidelity run directly."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from orch.cli import main
from orch.dashboards.published import not_comparable, published
from orch.dashboards.report import dashboard_html
from orch.execution.build import build_section
from orch.execution.trial import Trial
from orch.lock import live_evaluators
from orch.methods.data.images import subset
from orch.methods.evaluation import fid
from orch.methods.evaluation.kl import histogram_kl

pytestmark = pytest.mark.slow  # starts services or trains beyond a few steps (docs/development.md)

STUDIES = Path(__file__).resolve().parent / "studies"


@pytest.fixture(scope="module")
def checker_study(tmp_path_factory):
    """(workdir, study_dir) of final_tiny (4 checkerboard trials) after `orch submit --backend local`."""
    workdir = tmp_path_factory.mktemp("final")
    assert main(["submit", str(STUDIES / "final_tiny.yaml"), "--workdir", str(workdir)]) == 0
    return workdir, workdir / "final_tiny"


def runs_by_trial(study_dir: Path) -> dict:
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study_dir.name)
    runs = client.search_runs([experiment.experiment_id], "tags.`orch.role` = 'trial'")
    return client, {r.data.tags["orch.trial_id"]: r for r in runs}


def orch_eval(workdir: Path, *args: str) -> int:
    """`orch eval final_tiny …`'s exit code (argument errors exit through SystemExit, as from the command line)."""
    try:
        return main(["eval", "final_tiny", "--workdir", str(workdir), *args])
    except SystemExit as e:
        return e.code


def trial_ids(study_dir: Path) -> list[str]:
    return sorted(p.name for p in (study_dir / "trials").iterdir())


def test_last_checkpoint_at_seed_range_0_reproduces_the_trials_own_final_evaluation(checker_study):
    workdir, study_dir = checker_study
    first = trial_ids(study_dir)[0]
    assert orch_eval(workdir, "--trials", first, "--checkpoint", "last") == 0
    client, runs = runs_by_trial(study_dir)
    run = client.get_run(runs[first].info.run_id)
    for nfe in (1, 2):  # same weights, noise, labels and sample count: the very same number
        assert run.data.metrics[f"final/kl/nfe_{nfe}"] == run.data.metrics[f"eval/kl/nfe_{nfe}"]
        assert run.data.metrics[f"final/kl/nfe_{nfe}/seed_0"] == run.data.metrics[f"eval/kl/nfe_{nfe}"]
        assert run.data.metrics[f"final/kl/nfe_{nfe}/spread"] == 0.0
    record = json.loads(run.data.tags["orch.final.kl"])  # each series says how it was measured
    assert record["series"]["nfe_1"] == record["series"]["nfe_2"]
    protocol = record["protocols"][record["series"]["nfe_1"]]
    assert protocol["num_samples"] == 2000 and protocol["checkpoint"] == "last" and protocol["seeds"] == 1
    assert "KL" in protocol["measured_as"] and "checkpoint last" in protocol["measured_as"]
    assert run.data.tags["orch.direction.kl"] == "min"


def test_best_checkpoint_per_nfe_and_seed_ranges_mean_and_spread(checker_study):
    workdir, study_dir = checker_study
    trial = trial_ids(study_dir)[1]
    assert orch_eval(workdir, "--trials", trial, "--seeds", "3", "--nfe", "1") == 0
    client, runs = runs_by_trial(study_dir)
    metrics = client.get_run(runs[trial].info.run_id).data.metrics
    best = json.loads((study_dir / "trials" / trial / "best" / "best.json").read_text())
    assert metrics["final/kl/nfe_1/seed_0"] == best["eval/kl/nfe_1"]["value"]  # the best checkpoint, its own noise
    seeds = [metrics[f"final/kl/nfe_1/seed_{k}"] for k in range(3)]
    assert len(set(seeds)) == 3  # each seed range draws its own noise
    assert metrics["final/kl/nfe_1"] == pytest.approx(sum(seeds) / 3, rel=1e-12)
    assert metrics["final/kl/nfe_1/spread"] == pytest.approx((max(seeds) - min(seeds)) / 2, rel=1e-12)
    history = client.get_metric_history(runs[trial].info.run_id, "final/kl/nfe_1/seed_0")
    assert [m.step for m in history] == [best["eval/kl/nfe_1"]["step"]]


def large_evaluation(study_dir: Path) -> list[str]:
    """`orch eval` arguments that evaluate the third trial from 400,000 samples: 8 units of a few seconds each."""
    trial = trial_ids(study_dir)[2]
    return ["--trials", trial, "--checkpoint", "last", "--num", "400000", "--seeds", "4", "--nfe", "1,2"]


def test_a_second_run_does_nothing_and_a_killed_run_finishes_the_rest(checker_study, tmp_path):
    workdir, study_dir = checker_study
    trial = trial_ids(study_dir)[2]
    args = ["eval", "final_tiny", "--workdir", str(workdir), *large_evaluation(study_dir)]
    results = study_dir / "trials" / trial / "final.json"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    worker = subprocess.Popen([sys.executable, "-m", "orch.cli", *args], env=env, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(json.loads(results.read_text())["units"] if results.exists() else {}) < 2:
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert (study_dir / "evaluators" / f"{worker.pid}.json").exists()  # killed: it could not remove its record
    assert live_evaluators(study_dir) == [] and not (study_dir / "evaluators" / f"{worker.pid}.json").exists()
    kept = json.loads(results.read_text())["units"]
    assert 2 <= len(kept) < 8, "the kill came after the end: make the units slower"
    out = subprocess.run([sys.executable, "-m", "orch.cli", *args], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"{8 - len(kept)} evaluation(s) computed" in out.stdout
    again = subprocess.run([sys.executable, "-m", "orch.cli", *args], env=env, capture_output=True, text=True)
    assert "0 evaluation(s) computed" in again.stdout and "done already" in again.stdout
    client, runs = runs_by_trial(study_dir)
    units = json.loads(results.read_text())["units"]
    assert len(units) == 8 and all(u["logged"] for u in units.values())
    for key, unit in units.items():  # each value logged exactly once, the kept ones not recomputed
        history = client.get_metric_history(runs[trial].info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(unit["step"], unit["value"])]
        if key in kept:
            assert unit["value"] == kept[key]["value"]
    mean = client.get_metric_history(runs[trial].info.run_id, "final/kl/nfe_2")
    assert len(mean) == 1 and mean[0].value == pytest.approx(
        np.mean([units[f"final/kl/nfe_2/seed_{k}"]["value"] for k in range(4)])
    )


def test_cancel_stops_a_running_eval_which_keeps_its_finished_units(checker_study, tmp_path, capsys):
    """`orch cancel` finds the study's running `orch eval` (in a copy of the workdir, so that the other tests keep
    theirs) and stops it as Ctrl-C would: exit 130, the finished units kept, its record gone."""
    workdir, study_dir = checker_study
    shutil.copytree(workdir, tmp_path / "copy")
    trial = trial_ids(study_dir)[2]
    results = tmp_path / "copy" / "final_tiny" / "trials" / trial / "final.json"
    results.unlink(missing_ok=True)  # evaluated by another test before the copy: evaluate it again
    longer = ["--trials", trial, "--checkpoint", "last", "--num", "1000000", "--seeds", "4", "--nfe", "1,2,4,8"]
    args = ["eval", "final_tiny", "--workdir", str(tmp_path / "copy"), *longer]  # units far too long to finish
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    worker = subprocess.Popen([sys.executable, "-m", "orch.cli", *args], env=env, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (results.exists() and json.loads(results.read_text())["units"]):
        assert worker.poll() is None, "the evaluation ended before it could be cancelled"
        time.sleep(0.2)
    assert main(["cancel", "final_tiny", "--workdir", str(tmp_path / "copy")]) == 0
    assert f"stopped the `orch eval` process {worker.pid}" in capsys.readouterr().out
    assert worker.wait(60) == 130
    assert 1 <= len(json.loads(results.read_text())["units"]) < 16
    assert not list((tmp_path / "copy" / "final_tiny" / "evaluators").glob("*.json"))


FINAL_OF_RUN = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
experiment = client.get_experiment_by_name("final_tiny")
run = next(r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("orch.trial_id") == sys.argv[2])
rows = [[k, m.value, m.step] for k in run.data.metrics if k.startswith("final/")
        for m in client.get_metric_history(run.info.run_id, k)]
tags = {k: v for k, v in run.data.tags.items() if k.startswith("orch.final.")}
print(json.dumps({"run_id": run.info.run_id, "rows": sorted(rows), "tags": tags}))
"""
"""A trial's final rows and tags as a fresh process reads them (this process's MLflow keeps a store per URI)."""


def test_a_rebuilt_store_gets_back_what_orch_eval_logged(checker_study, tmp_path):
    """final.json keeps the rows and tags MLflow took: with mlflow.db lost, `orch resume` rebuilds each run from the
    trial directory, the final metrics and their protocol tags included, and says how many rows it logged."""
    workdir, study_dir = checker_study
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    trial = trial_ids(study_dir)[1]
    args = ["--trials", trial, "--checkpoint", "last", "--num", "3000", "--seeds", "2", "--nfe", "1"]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    orch = [sys.executable, "-m", "orch.cli"]
    assert subprocess.run([*orch, "eval", "final_tiny", "--workdir", str(copy), *args], env=env).returncode == 0
    uri = f"sqlite:///{copy / 'final_tiny' / 'mlflow.db'}"

    def final_of_run() -> dict:
        out = subprocess.run([sys.executable, "-c", FINAL_OF_RUN, uri, trial], env=env, capture_output=True, text=True)
        return json.loads(out.stdout)

    before = final_of_run()
    logged = json.loads((copy / "final_tiny" / "trials" / trial / "final.json").read_text())["logged"]
    assert sorted(logged) == before["rows"] and any(key == "final/kl/nfe_1/seed_1" for key, _, _ in logged)
    (copy / "final_tiny" / "mlflow.db").rename(tmp_path / "lost.db")
    resumed = subprocess.run([*orch, "resume", "final_tiny", "--workdir", str(copy)], env=env, capture_output=True,
                             text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"trial {trial}: its MLflow run" in resumed.stdout
    assert f"{len(logged)} final metric row(s)" in resumed.stdout
    after = final_of_run()
    assert after["run_id"] != before["run_id"]  # a new run, in the new store
    assert after["rows"] == before["rows"] and after["tags"] == before["tags"] and after["tags"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--trials", "nope"], "--trials nope: no trial 'nope'"),
        (["--trials", "../../other/trials/abc"], "is not a trial id"),
        (["--nfe", "1,4"], "no best checkpoint for eval/kl/nfe_4 (training did not evaluate it)"),
        (["--metrics", "fid"], "--metrics: fid needs a dataset with images"),
        (["--checkpoint", "newest"], "--checkpoint: 'newest' is not best, last or a step number"),
        (["--where", "method.widht=3"], "--where method.widht: no trial has this option"),
        (["--nfe", "1,x"], "--nfe '1,x': a comma-separated list of int values"),
        (["--guidance", "2"], "--guidance: guidance needs class-conditional data"),
    ],
)
def test_bad_requests_exit_2_with_one_line_and_change_nothing(checker_study, capsys, args, expected):
    workdir, study_dir = checker_study
    before = {p: p.stat().st_mtime_ns for p in study_dir.rglob("*") if p.is_file()}
    assert orch_eval(workdir, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert {p: p.stat().st_mtime_ns for p in study_dir.rglob("*") if p.is_file()} == before


def test_an_unreadable_best_index_is_named_before_anything_is_evaluated(checker_study, tmp_path, capsys):
    workdir, _ = checker_study
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    trial = trial_ids(copy / "final_tiny")[0]
    (copy / "final_tiny" / "trials" / trial / "best" / "best.json").write_text("{ garbage")
    assert orch_eval(copy, "--trials", trial) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "best/best.json is unreadable: use --checkpoint last" in err[0], err


def test_orch_sample_writes_the_points_orch_eval_scores(checker_study, capsys):
    workdir, study_dir = checker_study
    trial = trial_ids(study_dir)[3]
    out = study_dir.parent / "points.npy"
    args = ["sample", "final_tiny", "--workdir", str(workdir), "--trial", trial, "--nfe", "2", "--num", "2000"]
    assert main([*args, "--out", str(out)]) == 0
    points = torch.from_numpy(np.load(out))
    assert points.shape == (2000, 2) and points.dtype == torch.float32
    state = json.loads((study_dir / "trials" / trial / "best" / "best.json").read_text())
    dataset = build_section(Trial.load(study_dir / "trials" / trial).config, "dataset")
    assert histogram_kl(points, dataset) == pytest.approx(state["eval/kl/nfe_2"]["value"], abs=1e-6)
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2  # never overwrites
    assert "exists: remove it or choose another path" in capsys.readouterr().err
    assert main([*args, "--out", str(study_dir.parent / "points.npz")]) == 2  # 2-D data: .npy only
    assert "samples go to an .npy file" in capsys.readouterr().err
    assert not (study_dir.parent / "points.npz").exists()


def test_orch_table_is_the_ranking_of_the_trials_results(checker_study, capsys):
    workdir, study_dir = checker_study
    capsys.readouterr()
    assert main(["table", "final_tiny", "--workdir", str(workdir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| method | KL @1 | @2 | sec/kimg | fwd/sample | JVP/sample |"
    results = {}
    for trial in trial_ids(study_dir):
        config = Trial.load(study_dir / "trials" / trial).config
        state = json.loads((study_dir / "trials" / trial / "state.json").read_text())
        results.setdefault(config["method"]["name"], []).append(state["result"])
    expected = {}
    for method, rows in results.items():
        cells = []
        for nfe in (1, 2):
            values = [r[f"eval/kl/nfe_{nfe}"] for r in rows]
            cells.append(f"{np.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}")
        expected[method] = cells
    shown = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:3] for line in lines[2:]}
    assert shown == expected
    ordered = sorted(expected, key=lambda m: np.mean([r["eval/kl/nfe_1"] for r in results[m]]))
    assert [line.split(" | ")[0].strip("| ") for line in lines[2:]] == ordered
    assert main(["table", "final_tiny", "--workdir", str(workdir), "--format", "csv"]) == 0
    csv = capsys.readouterr().out.splitlines()
    assert csv[0].startswith("method,seeds,kl@1,kl@1 spread,kl@2,kl@2 spread") and len(csv) == 3
    assert main(["table", "final_tiny", "--workdir", str(workdir), "--format", "latex"]) == 0
    latex = capsys.readouterr().out
    assert latex.startswith(r"\begin{tabular}{lrrrrr}") and r"$\pm$" in latex and latex.count(r" \\") == 3
    assert main(["table", "final_tiny", "--workdir", str(workdir), "--metric", "fid"]) == 2


def test_eval_on_the_embedded_ray_runs_a_task_per_trial(checker_study, capsys):
    workdir, study_dir = checker_study
    trials = [trial_ids(study_dir)[i] for i in (1, 3)]
    capsys.readouterr()
    assert orch_eval(workdir, "--trials", *trials, "--backend", "ray", "--checkpoint", "last", "--nfe", "2") == 0
    out = capsys.readouterr().out  # the workers' lines, printed by the driver
    assert "2 evaluation(s) computed for 2 trial(s)" in out and out.count("kl nfe_2 seed range 0") == 2
    client, runs = runs_by_trial(study_dir)
    for trial in trials:
        metrics = client.get_run(runs[trial].info.run_id).data.metrics
        assert metrics["final/kl/nfe_2/seed_0"] == metrics["eval/kl/nfe_2"]


def test_dashboard_switches_to_final_values_and_says_published_ones_are_not_comparable(checker_study, capsys):
    workdir, study_dir = checker_study
    # the evaluations the tests above made (done already when the file runs in order): the first trial at NFE
    # 1 and 2, the second and fourth at NFE 2, the third from 400,000 samples
    ids = trial_ids(study_dir)
    assert orch_eval(workdir, "--trials", ids[0], "--checkpoint", "last") == 0
    assert orch_eval(workdir, "--trials", ids[1], ids[3], "--checkpoint", "last", "--nfe", "2") == 0
    assert orch_eval(workdir, *large_evaluation(study_dir)) == 0
    assert orch_eval(workdir, "--checkpoint", "last", "--nfe", "1") == 0  # every trial: one final protocol
    page = dashboard_html(f"sqlite:///{study_dir / 'mlflow.db'}", "final_tiny", study_dir / "trials")
    assert "final (orch eval)" in page and "in training" in page  # the switch of the quality-vs-NFE figure
    assert "Final evaluation (orch eval) by kl" in page and "final_kl.csv" in page and "table_kl.csv" in page
    # paper A's checker KLs are of 64,000 samples; these trials measured 2,000, in training and after
    assert "in training: Published kl of lsd, psd_mid" in page
    assert "final (orch eval): Published kl of lsd, psd_mid" in page
    assert page.count("not comparable (64,000 samples there, 2,000 here)") == 2
    # one trial's NFE 2 was measured from 400,000 samples: left out of the final view and table, and said so
    assert "final kl: 1 value(s) not shown, measured as KL(data ‖ model), 50×50 histogram of 400,000" in page
    capsys.readouterr()
    assert main(["table", "final_tiny", "--workdir", str(workdir), "--source", "final", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert "1 value(s) not shown" in err
    rows = [line.split(",") for line in out.splitlines()]
    header = rows[0]
    by_method = {r[0]: dict(zip(header, r)) for r in rows[1:]}
    assert header[:6] == ["method", "seeds", "kl@1", "kl@1 spread", "kl@2", "kl@2 spread"]
    assert {m: r["seeds"] for m, r in by_method.items()} == {"lsd": "2", "psd_mid": "2"}
    lsd_seed0 = trial_ids(study_dir)[2]  # the trial evaluated from 400,000 samples
    assert Trial.load(study_dir / "trials" / lsd_seed0).config["method"]["name"] == "lsd"
    assert by_method["lsd"]["kl@2 spread"] == "" and float(by_method["psd_mid"]["kl@2 spread"]) >= 0


def test_published_numbers_parse_and_protocols_are_compared():
    table = published()
    assert table.version >= 1 and len(table.entries) >= 5
    checker = next(e for e in table.entries if e.dataset == "checkerboard")
    assert checker.results["lsd"][1] == 0.086 and checker.num_samples == 64000
    assert not_comparable(checker, "checkerboard", "kl", 64000, False) is None
    assert "20,000 here" in not_comparable(checker, "checkerboard", "kl", 20000, False)
    assert "unconditional there" in not_comparable(checker, "checkerboard", "kl", 64000, True)


@pytest.fixture(scope="module")
def mnist_study(tmp_path_factory):
    """(workdir, study_dir) of mnist_final (one tiny MNIST trial with a best checkpoint at NFE 1)."""
    workdir = tmp_path_factory.mktemp("mnist_final")
    assert main(["submit", str(STUDIES / "mnist_final.yaml"), "--workdir", str(workdir)]) == 0
    return workdir, workdir / "mnist_final"


def test_inception_score_through_torch_fidelity_and_its_offline_refusal(capsys, mnist_study):
    # 10 classes, each sample certain of its own: p(y|x) one-hot, p(y) uniform ⇒ IS = exp(log 10) = 10
    logits = torch.full((1000, 1008), -40.0, dtype=torch.float64)
    logits[torch.arange(1000), torch.arange(1000) % 10] = 0.0
    assert fid.inception_score(logits, splits=1) == pytest.approx(10.0, rel=1e-9)
    logits[:, :10] = 0.0  # every sample unsure among the 10: IS = 1
    assert fid.inception_score(logits, splits=1) == pytest.approx(1.0, rel=1e-9)
    workdir, study_dir = mnist_study
    capsys.readouterr()
    code = main(["eval", "mnist_final", "--workdir", str(workdir), "--metrics", "is", "--num", "20"])
    if fid.has_logits():  # torch-fidelity's downloaded weights: a real Inception Score
        client, runs = runs_by_trial(study_dir)
        (run,) = runs.values()
        assert code == 0 and client.get_run(run.info.run_id).data.metrics["final/is/nfe_1"] >= 1.0
        return
    err = capsys.readouterr().err.strip().splitlines()  # the offline weights have no classifier
    assert code == 2 and len(err) == 1 and "classifier layer" in err[0] and fid.WEIGHTS_FILE in err[0]


def test_orch_sample_npz_is_adm_layout_and_torch_fidelity_gives_orch_evals_fid(tmp_path, mnist_study):
    import torch_fidelity

    workdir, study_dir = mnist_study
    trial = trial_ids(study_dir)[0]
    common = ["--workdir", str(workdir), "--nfe", "1", "--num", "16"]
    assert main(["eval", "mnist_final", *common, "--metrics", "fid,kid,prc"]) == 0
    out = tmp_path / "s.npz"
    assert main(["sample", "mnist_final", *common, "--trial", trial, "--out", str(out)]) == 0
    with zipfile.ZipFile(out) as archive:
        assert archive.namelist() == ["arr_0.npy"]  # unconditional: no labels
    images = np.load(out)["arr_0"]
    assert images.shape == (16, 28, 28, 3) and images.dtype == np.uint8
    assert (images[..., 0] == images[..., 2]).all()  # grey repeated to RGB, as ADM's evaluator reads it

    class Images(torch.utils.data.Dataset):
        def __init__(self, pixels):
            self.pixels = pixels

        def __len__(self):
            return len(self.pixels)

        def __getitem__(self, i):
            return self.pixels[i]

    config = Trial.load(study_dir / "trials" / trial).config
    reference = subset(build_section(config, "dataset").images, 48)
    scores = torch_fidelity.calculate_metrics(
        input1=Images(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()),
        input2=Images(reference.expand(-1, 3, -1, -1).contiguous()),
        fid=True,
        feature_extractor_weights_path=str(fid.inception_weights()),
        verbose=False,
        cuda=False,
    )
    client, runs = runs_by_trial(study_dir)
    metrics = client.get_run(runs[trial].info.run_id).data.metrics
    assert abs(metrics["final/fid/nfe_1"] - scores["frechet_inception_distance"]) < 1e-3
    assert 0 <= metrics["final/precision/nfe_1"] <= 1 and 0 <= metrics["final/recall/nfe_1"] <= 1
    assert np.isfinite(metrics["final/kid/nfe_1"])
