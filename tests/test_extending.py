"""Extending orch: a method, a metric (higher is better) and a backend, each registered from this file alone,
run through the real CLI; and an installed plugin package that adds components through the `orch.plugins`
entry-point group. The components import only from the plugin API, orch.api."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from torch import Tensor, nn

from orch.api import (
    BACKENDS,
    JOB_FILE,
    METHODS,
    METRICS,
    Backend,
    BackendParams,
    Method,
    MethodParams,
    Term,
    TimeSamplerParams,
    Uniform,
    diagonal_term,
    read_json,
    register_backend,
    register_method,
    register_metric,
    write_json,
)
from orch.cli import main
from orch.dashboards import figures
from orch.dashboards.load import load_runs
from orch.dashboards.report import direction_of
from tests.conftest import STUDIES

pytestmark = pytest.mark.slow  # starts services or trains beyond a few steps (docs/development.md)

ROOT = Path(__file__).resolve().parents[1]


# ---- a method: flow matching sampled with the explicit midpoint rule ---------------------------------------------


class MidpointParams(MethodParams):
    pass


class MidpointFlowMatching(Method):
    """Flow matching sampled with the explicit midpoint rule (2 network evaluations per step; test-only)."""

    Params = MidpointParams

    def terms(self, net: nn.Module, x1: Tensor, step: int, gen: torch.Generator) -> list[Term]:
        x0 = self.setting.interpolant.sample_base(x1.shape[0], x1.shape[1:], gen)
        t = Uniform(TimeSamplerParams()).diagonal(x1.shape[0], gen)
        return [diagonal_term(net, self.setting.interpolant, x0, x1, t)]

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: torch.Generator) -> Tensor:
        x, steps = x0, max(nfe // 2, 1)
        for k in range(steps):
            t = torch.full((x.shape[0],), k / steps, device=x.device)
            half = t + 0.5 / steps
            x_mid = x + 0.5 / steps * net(x, t, t)
            x = x + net(x_mid, half, half) / steps
        return x


# ---- a metric where higher is better ------------------------------------------------------------------------------


def coverage(samples: Tensor, dataset, evaluation, device: torch.device) -> float:
    """Fraction of the samples where the target density is positive (test-only)."""
    return float((dataset.density(samples.double().cpu()) > 0).double().mean())


# ---- a backend: every trial in a Python subprocess of its own ----------------------------------------------------

RUN_ONE = "import sys; from orch.api import Trial, run_trial; run_trial(Trial.load(sys.argv[1]))"


class ProcessesParams(BackendParams):
    name: str = "test_processes"


class Processes(Backend):
    """Each trial in a Python subprocess of its own, one after the other (test-only)."""

    Params = ProcessesParams
    live_job_states = frozenset({"RUNNING"})
    started: dict[str, subprocess.Popen] = {}

    def run(self, trials, study_dir, study, progress, say) -> None:
        for trial in trials:
            progress.started(trial.id)
            job = subprocess.Popen([sys.executable, "-c", RUN_ONE, trial.dir], cwd=ROOT)
            self.started[str(job.pid)] = job
            write_json(Path(trial.dir) / JOB_FILE, {"job_id": str(job.pid)})
            job.wait()
            progress.finished(trial.id, read_json(Path(trial.dir) / "state.json")["status"])

    def job_states(self, job_ids: list[str]) -> dict[str, str]:
        return {i: "RUNNING" if self.started[i].poll() is None else "EXITED" for i in job_ids if i in self.started}


# ---- registered for this module's tests only: the rest of the suite sees orch's own components -------------------


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_method("test_midpoint_fm")(MidpointFlowMatching)
    register_metric(
        "test_coverage", direction="max", title="fraction of samples in the support", requires=("density",)
    )(coverage)
    register_backend("test_processes")(Processes)
    yield
    METHODS.unregister("test_midpoint_fm")
    METRICS.unregister("test_coverage")
    BACKENDS.unregister("test_processes")


# ---- the tests ----------------------------------------------------------------------------------------------------


def tiny_study(tmp_path: Path, name: str, **changes) -> Path:
    raw = yaml.safe_load((STUDIES / "tiny.yaml").read_text())
    raw["name"] = name
    for key, value in changes.items():
        section, _, option = key.partition("__")
        raw.setdefault(section, {})
        if option:
            raw[section][option] = value
        else:
            raw[section] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def trial_runs(uri: str, study: str) -> list:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(study).experiment_id], max_results=100)
    return [r for r in runs if r.data.tags.get("orch.role") == "trial"]


def test_a_method_and_a_higher_is_better_metric_registered_from_one_file(tmp_path, capsys):
    study = tiny_study(
        tmp_path,
        "extended",
        grid={"train.seed": [0, 1]},
        base__method={"name": "test_midpoint_fm"},
        backend={"name": "local"},
    )
    raw = yaml.safe_load(study.read_text())
    raw["base"]["eval"] |= {"metrics": ["kl", "test_coverage"], "every": 10, "nfe": [2, 4]}
    raw["base"]["train"]["steps"] = 40
    study.write_text(yaml.safe_dump(raw))
    assert main(["describe", "method.test_midpoint_fm"]) == 0
    assert "explicit midpoint rule" in capsys.readouterr().out
    assert main(["submit", str(study), "--workdir", str(tmp_path / "runs")]) == 0

    study_dir = tmp_path / "runs" / "extended"
    uri = f"sqlite:///{study_dir / 'mlflow.db'}"
    runs = trial_runs(uri, "extended")
    assert len(runs) == 2
    client = MlflowClient(uri)
    for run in runs:
        assert run.data.tags["orch.status"] == "completed"
        assert run.data.tags["orch.direction.test_coverage"] == "max"
        assert run.data.tags["orch.direction.kl"] == "min"
        trial_dir = study_dir / "trials" / run.data.tags["orch.trial_id"]
        best = read_json(trial_dir / "best" / "best.json")
        for metric, pick in (("test_coverage", max), ("kl", min)):
            history = [m.value for m in client.get_metric_history(run.info.run_id, f"eval/{metric}/nfe_2")]
            assert len(history) == 4 and len(set(history)) > 1  # evaluated at steps 10, 20, 30, 40, and it moved
            assert best[f"eval/{metric}/nfe_2"]["value"] == pytest.approx(pick(history))

    frame, history, _ = load_runs(uri, "extended")
    assert direction_of(frame, "test_coverage") == "max"
    table = figures.ranking(frame, history, "test_coverage", ["factor.train.seed"], "max")
    assert list(table["test_coverage@2"]) == sorted(table["test_coverage@2"], reverse=True)  # best first
    page = (study_dir / "dashboard.html").read_text()
    assert "Ranking by test_coverage at 2 step, higher is better" in page


def test_a_backend_registered_from_one_file_runs_a_study_and_reports_its_jobs(tmp_path, capsys):
    study = tiny_study(tmp_path, "subprocesses", grid={"method.name": ["fm", "lsd"]})
    workdir = tmp_path / "runs"
    assert main(["submit", str(study), "--workdir", str(workdir), "--backend", "test_processes"]) == 0
    assert "on backend 'test_processes'" in capsys.readouterr().out
    trial_dirs = sorted((workdir / "subprocesses" / "trials").iterdir())
    assert len(trial_dirs) == 2
    pids = {read_json(d / JOB_FILE)["job_id"] for d in trial_dirs}
    assert len(pids) == 2 and pids <= set(Processes.started)  # each trial ran in a process this backend started
    assert all(read_json(d / "state.json")["status"] == "completed" for d in trial_dirs)

    assert main(["status", "subprocesses", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    for pid in pids:
        assert f"[test_processes {pid} EXITED]" in out

    # a search needs a backend that hosts one: refused, naming it, before anything is created
    search = yaml.safe_load((STUDIES / "search_tiny.yaml").read_text())
    search["name"] = "search_elsewhere"
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    submit = ["submit", str(tmp_path / "search.yaml"), "--workdir", str(workdir), "--backend", "test_processes"]
    with pytest.raises(SystemExit) as refused:
        main(submit)
    assert refused.value.code == 2
    assert "--backend: backend 'test_processes' cannot run a search (ray can)" in capsys.readouterr().err
    assert not (workdir / "search_elsewhere").exists()


RING = '''
"""A 2-D ring of radius 0.6 with a known density: a dataset, as a plugin or a built-in file would add it."""

import math

import torch

from orch.api import DATASETS, Density2D, Params


class RingParams(Params):
    width: float = 0.1
    """Width of the ring (uniform across it)."""


class Ring(Density2D):
    bounds = (-1.0, 1.0)

    def __init__(self, width):
        self.inner, self.outer = 0.6 - width / 2, 0.6 + width / 2
        self.std = torch.full((2,), 0.6 / math.sqrt(2))

    def sample(self, n, gen):
        angle = 2 * math.pi * torch.rand(n, generator=gen)
        radius = (self.inner**2 + (self.outer**2 - self.inner**2) * torch.rand(n, generator=gen)).sqrt()
        return torch.stack([radius * angle.cos(), radius * angle.sin()], 1)

    def density(self, xy):
        r = xy.norm(dim=-1)
        area = math.pi * (self.outer**2 - self.inner**2)
        return torch.where((r >= self.inner) & (r < self.outer), 1 / area, 0.0).to(xy.dtype)


@DATASETS.register("ring", RingParams, provides=("density",))
def build_ring(params):
    """A uniform ring around the origin (plugin)."""
    return Ring(params.width)
'''

RESIDUAL = '''
"""A residual MLP: a network, as a plugin or a built-in file would add it."""

import torch
from torch import nn

from orch.api import MODELS, Params


class ResidualParams(Params):
    width: int = 32
    """Units per layer."""


class Residual(nn.Module):
    def __init__(self, dim, width, data_std):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(dim + 2, width), nn.SiLU(), nn.Linear(width, dim))
        self.register_buffer("data_std", data_std.clone().float())

    def forward(self, x, a, b):
        return self.inner(torch.cat([a[:, None], b[:, None], x / self.data_std], 1)) * self.data_std


@MODELS.register("residual", ResidualParams)
def build_residual(params, data_shape, data_std):
    """A one-hidden-layer network (plugin)."""
    return Residual(data_shape[0], params.width, data_std)
'''


def test_an_installed_plugin_package_adds_a_dataset_and_a_network(tmp_path):
    package = tmp_path / "orch-ring"
    (package / "orch_ring").mkdir(parents=True)
    (package / "orch_ring" / "__init__.py").write_text(
        '"""An orch plugin: a dataset and a network."""\nfrom orch_ring import residual, ring  # noqa: F401\n'
    )
    (package / "orch_ring" / "ring.py").write_text(RING)
    (package / "orch_ring" / "residual.py").write_text(RESIDUAL)
    (package / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "orch-ring"
            version = "0.1"

            [project.entry-points."orch.plugins"]
            ring = "orch_ring"
            broken = "orch_ring_missing"
            """
        )
    )
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target"]
    subprocess.run([*pip, str(site), str(package)], check=True, capture_output=True)
    env = {"PYTHONPATH": f"{site}:{ROOT}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def orch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orch.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    described = orch("describe", "dataset.ring")
    assert described.returncode == 0, described.stderr
    assert "A uniform ring around the origin (plugin)" in described.stdout and "`dataset.width`" in described.stdout
    assert "plugin 'broken' (orch_ring_missing) was not loaded: ModuleNotFoundError" in described.stderr

    study = tiny_study(
        tmp_path,
        "ring",
        grid={"train.seed": [0, 1]},
        base__dataset={"name": "ring"},
        base__model={"name": "residual", "width": 32},
    )
    done = orch("submit", str(study), "--workdir", str(tmp_path / "runs"))  # on Ray: the workers load it too
    assert done.returncode == 0, done.stdout + done.stderr
    states = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "ring" / "trials").glob("*/state.json")]
    assert len(states) == 2 and all(s["status"] == "completed" for s in states)
    assert all(0 < s["result"]["eval/kl/nfe_1"] < 5 for s in states)

    assert orch("validate", str(study)).returncode == 0
    env["PYTHONPATH"] = str(ROOT)  # without the plugin installed its names are unknown, and said to be
    missing = orch("validate", str(study))
    assert missing.returncode == 2 and "unknown dataset 'ring'" in missing.stderr
