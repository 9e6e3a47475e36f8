"""Data-parallel trials reproduce one device: W ranks × B/W samples train the parameters that 1 rank × B does
(gloo process groups of real processes on this CPU), through Ray Train workers inside the study's Tune run too,
and a killed driver of a data-parallel trial resumes it from its checkpoint."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from orch.cli import main
from orch.execution.build import build_network, build_trainer, needs_teacher
from orch.execution.distributed import run_local_ranks
from orch.execution.processes import is_running
from orch.methods.evaluation import fid
from orch.methods.evaluation.generation import EvalConfig, eval_labels, generate
from orch.methods.runtime.parallel import (
    ShardedGenerator,
    gather_rows,
    positions,
    rand,
    randint,
    randn,
    split_count,
    world_of,
)
from orch.trial.config import resolve_trial_config
from orch.trial.typed import TrialConfig
from tests.conftest import STUDIES, recorded_processes
from tests.test_fault_tolerance import ROOT, states, trial_runs
from tests.test_search import check_finished_search

STEPS = 20


def config_for(method: dict, batch_size: int = 64, **train) -> dict:
    config, problems = resolve_trial_config(
        {
            "method": method,
            "model": {"width": 32, "depth": 2},
            "train": {"batch_size": batch_size, "device": "cpu", "ema": [0.9], "lr": 1e-3, **train},
        }
    )
    assert not problems, problems
    return config


def teacher_for(config: dict) -> torch.nn.Module | None:
    """A frozen network (any will do for an equivalence), the same in every process: built from a fixed seed."""
    if not needs_teacher(config["method"]):
        return None
    return build_network(TrialConfig.parse(config | {"train": config["train"] | {"seed": 123}}))


def train_and_save(config: dict, out: str) -> None:
    """STEPS training steps of `config` in this process (one rank of a group, or alone); rank 0 saves the
    student's and the EMA copy's parameters and the last logged statistics to `out`."""
    trainer = build_trainer(TrialConfig.parse(config), torch.device("cpu"), teacher_for(config))
    stats = {}
    for step in range(STEPS):
        stats = trainer.train_step(with_stats=step % 5 == 4) or stats
    if trainer.rank == 0:
        torch.save({"net": trainer.net.net.state_dict(), "ema": trainer.ema_net().state_dict(), "stats": stats}, out)


def relative_difference(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in b)


@pytest.mark.parametrize(
    "method, train",
    [
        ({"name": "lsd"}, {}),
        ({"name": "meanflow"}, {}),
        ({"name": "sdei"}, {}),
        ({"name": "lsd"}, {"micro_batches": 2}),
    ],
    ids=["lsd", "meanflow-jvp", "sdei-teacher", "lsd-micro-batches"],
)
@pytest.mark.slow
def test_two_workers_with_half_batches_train_what_one_worker_with_the_whole_batch_does(tmp_path, method, train):
    config = config_for(method, **train)
    train_and_save(config, str(tmp_path / "one.pt"))
    run_local_ranks(train_and_save, 2, "cpu", config, str(tmp_path / "two.pt"))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert relative_difference(two["net"], one["net"]) < 1e-5
    assert relative_difference(two["ema"], one["ema"]) < 1e-5
    assert two["stats"].keys() == one["stats"].keys()
    for key, value in one["stats"].items():  # statistics of the whole batch, gathered over the ranks
        assert two["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    assert one["stats"]["train/loss"] > 0  # a real loss was trained on


def evaluate_and_save(config: dict, out: str) -> None:
    """A few training steps, then the trial's evaluation and its samples at every NFE and guidance scale, with
    this process's share of the sampling; each rank saves both to `out`.<rank>."""
    trainer = build_trainer(TrialConfig.parse(config), torch.device("cpu"), teacher_for(config))
    for _ in range(3):
        trainer.train_step()
    evaluation = EvalConfig.model_validate(config["eval"])
    scores, _ = trainer.evaluate(evaluation)
    labels = eval_labels(trainer.dataset, evaluation.num_samples, trainer.cfg.seed)
    samples = {
        (nfe, omega): generate(trainer.method, trainer.ema_net(), trainer.interpolant, trainer.dataset, evaluation,
                               nfe, trainer.cfg.seed, trainer.device, omega, labels)
        for nfe in evaluation.nfe for omega in evaluation.guidance
    }  # fmt: skip
    inception = "inception" in fid.MEMO  # this process passed samples through the Inception
    torch.save({"scores": scores, "samples": samples, "inception": inception}, f"{out}.{trainer.rank}")


@pytest.mark.parametrize(
    "section",
    [
        {"method": {"name": "sct"}},  # a sampler that re-noises from the evaluation's own generator
        {"method": {"name": "meanflow"}, "dataset": {"name": "gmm", "conditional": True}, "eval": {
            "metrics": ["kl_cond"], "nfe": [2, 4], "guidance": [1.0, 2.0]}},  # labels and two-pass guidance
    ],
    ids=["sct-renoise", "meanflow-guided"],
)  # fmt: skip
@pytest.mark.slow
def test_two_workers_share_the_sampling_of_an_evaluation_and_score_what_one_worker_does(tmp_path, section):
    config, problems = resolve_trial_config(
        {
            "model": {"width": 32, "depth": 2},
            "train": {"batch_size": 64, "device": "cpu", "ema": [0.9]},
            "eval": {"nfe": [1, 2], "num_samples": 2000, "batch_size": 500} | section.get("eval", {}),
        }
        | {k: v for k, v in section.items() if k != "eval"}
    )
    assert not problems, problems
    evaluate_and_save(config, str(tmp_path / "one"))
    run_local_ranks(evaluate_and_save, 2, "cpu", config, str(tmp_path / "two"))
    one, two, other = (torch.load(tmp_path / name) for name in ("one.0", "two.0", "two.1"))
    assert one["samples"].keys() == two["samples"].keys()
    for key, samples in one["samples"].items():
        assert samples.shape == two["samples"][key].shape == (2000, 2)
        torch.testing.assert_close(two["samples"][key], samples, rtol=1e-5, atol=1e-5)
        assert torch.equal(other["samples"][key], two["samples"][key])  # rank 1 sampled its share, got them all
    assert other["scores"] == {}  # rank 0 alone scores
    assert one["scores"].keys() == two["scores"].keys() and one["scores"]
    for key, value in one["scores"].items():
        assert two["scores"][key] == pytest.approx(value, rel=1e-4), key


def inception_and_save(images: torch.Tensor, out: str) -> None:
    pool, logits = fid.inception_outputs(images, torch.device("cpu"), batch=2, shard=True)
    torch.save({"pool": pool, "logits": logits}, f"{out}.{world_of()[0]}")


@pytest.mark.slow
def test_two_workers_share_the_inception_pass_and_each_gets_every_feature_in_order(tmp_path):
    images = torch.randint(0, 256, (7, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    alone = fid.inception_outputs(images, torch.device("cpu"))
    run_local_ranks(inception_and_save, 2, "cpu", images, str(tmp_path / "two"))  # 4 + 3 rows, one padded
    for rank in (0, 1):
        shared = torch.load(tmp_path / f"two.{rank}")
        assert shared["pool"].shape == (7, 2048) and shared["pool"].abs().max() > 0.1
        torch.testing.assert_close(shared["pool"], alone[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shared["logits"], alone[1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_workers_score_fid_as_one_worker_does(tmp_path):
    config, problems = resolve_trial_config(
        {
            "dataset": {"name": "mnist", "limit": 200},
            "model": {"name": "unet", "channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "time_scale": 1000.0},
            "method": {"name": "fm"},
            "train": {"batch_size": 8, "device": "cpu", "ema": [0.9]},
            "eval": {"nfe": [1], "metrics": ["fid", "kid"], "num_samples": 20, "batch_size": 10, "fid_reference": 20},
        }
    )
    assert not problems, problems
    evaluate_and_save(config, str(tmp_path / "one"))
    run_local_ranks(evaluate_and_save, 2, "cpu", config, str(tmp_path / "two"))
    assert torch.load(tmp_path / "two.1")["inception"]  # rank 1 passed its share of the samples
    one, two = (torch.load(tmp_path / name)["scores"] for name in ("one.0", "two.0"))
    assert one.keys() == two.keys() == {"eval/fid/nfe_1", "eval/kid/nfe_1"} and one["eval/fid/nfe_1"] > 0
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-5), key


def test_each_rank_holds_its_strided_rows_of_the_draws_one_process_makes():
    def draws(gen, n):
        return [rand(gen, n, 2), randn(gen, n), randint(gen, 10, n), positions(gen, n)]

    whole = draws(torch.Generator().manual_seed(0), 18)  # one process, a batch of 18
    for r in range(3):  # rank r of 3, 6 rows each: rows r, r + 3, … of every one of those draws
        for mine, full in zip(draws(ShardedGenerator(torch.Generator().manual_seed(0), r, 3), 6), whole):
            assert torch.equal(mine, full[r::3])
    assert torch.equal(gather_rows(whole[0], 1), whole[0])


def test_a_batch_split_that_workers_cannot_share_equally_is_rounded_down_with_a_warning(caplog):
    three_quarters = lambda m: int(0.75 * m)  # noqa: E731 — LSD's diagonal share
    assert split_count(ShardedGenerator(torch.Generator(), 1, 2), 32, three_quarters) == 24  # 48 of 64: exact
    assert not caplog.records
    assert split_count(ShardedGenerator(torch.Generator(), 1, 2), 5, three_quarters) == 3  # 7 of 10 → 6
    assert "a batch of 10 splits into 7 + 3 rows" in caplog.text and "rounded down to 6 rows" in caplog.text


def results(study_dir) -> dict[str, dict[str, float]]:
    return {trial: state.result for trial, state in states(study_dir).items()}


@pytest.mark.slow
def test_a_two_worker_trial_next_to_a_one_worker_trial_in_one_tune_run_equals_one_worker_runs(tmp_path):
    mixed = STUDIES / "parallel_mixed.yaml"  # lsd on two Ray Train workers, meanflow on one, in one Tune run
    assert main(["submit", str(mixed), "--workdir", str(tmp_path / "mixed")]) == 0
    one = ["submit", str(STUDIES / "parallel.yaml"), "--backend", "local", "--workdir", str(tmp_path / "one")]
    assert main([*one, "backend.workers_per_trial=1"]) == 0  # the reference: each trial in one process
    two, one = tmp_path / "mixed" / "parallel_mixed", tmp_path / "one" / "parallel"
    assert {s.status for s in states(two).values()} == {"completed"} and len(states(two)) == 2
    assert len(trial_runs(two, "parallel_mixed")) == 2  # one MLflow child run per trial, not per worker
    workers = {t: json.loads((two / "trials" / t / "trial.json").read_text())["config"]["train"] for t in states(two)}
    assert sorted(train["workers"] for train in workers.values()) == [1, 2]
    assert results(one).keys() == results(two).keys()  # the same trial ids: the workers are not part of a trial
    for trial, scores in results(one).items():
        assert scores.keys() == results(two)[trial].keys() and scores
        for key, value in scores.items():
            assert results(two)[trial][key] == pytest.approx(value, rel=1e-4), (trial, key)
    (lsd,) = [t for t, train in workers.items() if train["workers"] == 2]
    losses = [json.loads(line) for line in (two / "trials" / lsd / "metrics.jsonl").read_text().splitlines()]
    assert len({(row["key"], row["step"]) for row in losses}) == len(losses)  # each metric once per step


@pytest.mark.slow
def test_a_killed_driver_of_a_data_parallel_trial_resumes_from_its_checkpoint(tmp_path):
    study_dir = tmp_path / "parallel_long"
    command = [sys.executable, "-m", "orch.cli", "submit", str(STUDIES / "parallel_long.yaml")]
    driver = subprocess.Popen(
        [*command, "--workdir", str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not any(s.status == "running" and 50 <= s.step < 200 for s in states(study_dir).values()):
        assert driver.poll() is None and time.time() < deadline, "the trial ended before it could be killed"
        time.sleep(0.1)
    started = recorded_processes(study_dir)  # Ray's servers and the workers that took a trial
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    (before,) = states(study_dir).values()

    assert main(["resume", "parallel_long", "--workdir", str(tmp_path)]) == 0
    assert not [r for r in started if is_running(r)], "processes of the killed driver were left running"
    (after,) = states(study_dir).values()
    assert after.status == "completed" and after.run_id == before.run_id
    assert len(trial_runs(study_dir, "parallel_long")) == 1
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(after.run_id, "train/loss")]
    assert sorted(set(steps)) == list(range(20, 201, 20))
    replayed = {s for s in steps if steps.count(s) > 1}
    assert all(s > before.step for s in replayed), (before.step, replayed)  # only steps after its checkpoint


def test_a_batch_the_workers_cannot_share_is_refused_before_anything_runs(tmp_path, capsys):
    uneven = ["submit", str(STUDIES / "parallel.yaml"), "train.batch_size=255", "--workdir", str(tmp_path)]
    with pytest.raises(SystemExit) as refused:
        main(uneven)
    assert refused.value.code == 2 and not list(tmp_path.iterdir())  # nothing created
    assert "train.batch_size: 255 does not split into 2 data-parallel worker(s)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_search_of_data_parallel_trials_is_scheduled_and_stopped_early_by_asha(tmp_path):
    # two samples: the search is seeded and CPU training deterministic, so ASHA stops the second at every run
    search = ["submit", str(STUDIES / "search_tiny.yaml"), "backend.workers_per_trial=2", "search.num_samples=2",
              "--workdir", str(tmp_path)]  # fmt: skip
    assert main(search) == 0
    check_finished_search(tmp_path / "search_tiny", "search_tiny", samples=2)  # one run each, the best named
    stopped = [s for s in states(tmp_path / "search_tiny").values() if s.status == "stopped"]
    assert stopped and all(s.step < 150 for s in stopped)  # ASHA's stop reached the workers at an evaluation


@pytest.mark.slow
def test_local_data_parallel_trials_complete_and_warn_of_a_split_they_cannot_share(tmp_path, capsys):
    # 36 rows: MeanFlow shares them 18 + 18; LSD's diagonal share 27 cannot be halved: it trains on 26, saying so
    study = ["submit", str(STUDIES / "parallel.yaml"), "train.batch_size=36", "--backend", "local",
             "backend.workers_per_trial=2"]  # fmt: skip
    assert main([*study, "--workdir", str(tmp_path)]) == 0
    shown = capsys.readouterr().out  # rank 0's progress, forwarded from its process to the progress view
    assert "name=meanflow: step 30/60 kl/nfe_1=" in shown and "name=lsd: step 60/60 kl/nfe_1=" in shown
    trials = tmp_path / "parallel" / "trials"
    method = {
        t: json.loads((trials / t / "trial.json").read_text())["config"]["method"]["name"]
        for t in states(trials.parent)
    }
    by_method = {method[t]: s for t, s in states(trials.parent).items()}
    assert {s.status for s in by_method.values()} == {"completed"} and all(s.result for s in by_method.values())
    assert not by_method["meanflow"].warnings
    (warning,) = by_method["lsd"].warnings  # once, from rank 0, kept with the trial and shown by the driver
    assert "a batch of 36 splits into 27 + 9 rows" in warning and "rounded down to 26 rows" in warning
    assert len(trial_runs(tmp_path / "parallel", "parallel")) == 2


def test_worker_counts_a_backend_cannot_place_or_a_search_would_vary_are_refused(capsys):
    mixed = ["plan", str(STUDIES / "parallel_mixed.yaml")]
    with pytest.raises(SystemExit) as refused:
        main([*mixed, "backend.name=slurm", "backend.nodes=3"])  # lsd's 2 workers over 3 nodes
    assert refused.value.code == 2
    assert "train.workers (line 7): 2 worker(s) do not spread equally over backend.nodes 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["plan", str(STUDIES / "search_tiny.yaml"), "search.space={train.workers: {choice: [1, 2]}}"])
    assert refused.value.code == 2
    assert "search.space.train.workers" in (err := capsys.readouterr().err) and "every sample would be the same" in err


@pytest.mark.slow
def test_a_stop_at_a_log_tick_that_also_evaluates_ends_every_rank(tmp_path):
    """Rank 0 sees a stop request while logging (as a search scheduler's arrives); when that tick also evaluates,
    the other ranks must not enter the evaluation's collectives without it."""
    command = [sys.executable, "-m", "orch.cli", "submit", str(STUDIES / "parallel.yaml"), "--backend", "local",
               "backend.workers_per_trial=2", "train.log_every=10", "eval.every=10",
               "--workdir", str(tmp_path)]  # fmt: skip
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials, asked, deadline = tmp_path / "parallel" / "trials", set(), time.time() + 120
    while driver.poll() is None and time.time() < deadline:
        for trial in trials.glob("*/"):  # a stop waiting before rank 0's first report (the backend clears it first)
            channel, stop = trial / "progress.jsonl", trial / "stop_requested"
            if not (channel.exists() and channel.stat().st_size) and not stop.exists():
                stop.touch()
                asked.add(trial.name)
        time.sleep(0.01)
    try:
        assert driver.wait(timeout=5) == 0
    except subprocess.TimeoutExpired:
        raise AssertionError("the ranks did not stop together: a rank waits in a collective") from None
    finally:
        driver.kill()
    assert asked and {s.status for s in states(tmp_path / "parallel").values()} == {"stopped"}
    assert all(s.step < 60 for s in states(tmp_path / "parallel").values())
