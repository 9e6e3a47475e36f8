"""Adding a built-in component is one file. In a scratch copy of the repository, one new file each adds a method,
a network, a dataset, a metric with an option of its own and a backend; with no other file changed, `orch describe`
lists them, a study naming all five runs through the CLI, the regenerated option reference documents them, and
the fast tests pass."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"orch": "orchestrator", "orch.methods": "methods", "orch.dashboards": "dashboards"}

pytestmark = pytest.mark.slow

NEW_FILES = {
    "methods/losses/one_file_fm.py": '''
        """Flow matching sampled with the explicit midpoint rule: a method added as one file (test-only)."""

        import torch

        from orch.api import Method, MethodParams, Uniform, TimeSamplerParams, diagonal_term, register_method


        @register_method("one_file_fm")
        class MidpointFM(Method):
            """Flow matching, sampled with the midpoint rule (2 evaluations per step)."""

            Params = MethodParams

            def expected_passes(self, batch):
                return 1.0, 0.0

            def terms(self, net, x1, step, gen):
                x0 = self.setting.interpolant.sample_base(x1.shape[0], x1.shape[1:], gen)
                t = Uniform(TimeSamplerParams()).diagonal(x1.shape[0], gen)
                return [diagonal_term(net, self.setting.interpolant, x0, x1, t)]

            def sample(self, net, x0, nfe, gen):
                x, steps = x0, max(nfe // 2, 1)
                for k in range(steps):
                    t = torch.full((x.shape[0],), k / steps, device=x.device)
                    half = t + 0.5 / steps
                    x = x + net(x + 0.5 / steps * net(x, t, t), half, half) / steps
                return x
    ''',
    "methods/networks/one_file_net.py": '''
        """A one-hidden-layer flow-map network: a network added as one file (test-only)."""

        import torch
        from torch import nn

        from orch.api import MODELS, Params


        class OneFileNetParams(Params):
            width: int = 32
            """Units of the hidden layer."""


        class OneFileNet(nn.Module):
            def __init__(self, dim, width, data_std):
                super().__init__()
                self.inner = nn.Sequential(nn.Linear(dim + 2, width), nn.SiLU(), nn.Linear(width, dim))
                self.register_buffer("data_std", data_std.clone().float())

            def forward(self, x, a, b):
                return self.inner(torch.cat([a[:, None], b[:, None], x / self.data_std], 1)) * self.data_std


        @MODELS.register("one_file_net", OneFileNetParams)
        def build(params, data_shape, data_std):
            """A one-hidden-layer network (test-only)."""
            return OneFileNet(data_shape[0], params.width, data_std)
    ''',
    "methods/data/one_file_ring.py": '''
        """A uniform ring with a known density: a dataset added as one file (test-only)."""

        import math

        import torch

        from orch.api import DATASETS, Density2D, Params, rand


        class RingParams(Params):
            width: float = 0.1
            """Width of the ring."""


        class Ring(Density2D):
            bounds = (-1.0, 1.0)

            def __init__(self, width):
                self.inner, self.outer = 0.6 - width / 2, 0.6 + width / 2
                self.std = torch.full((2,), 0.6 / math.sqrt(2))

            def sample(self, n, gen):
                angle = 2 * math.pi * rand(gen, n)
                radius = (self.inner**2 + (self.outer**2 - self.inner**2) * rand(gen, n)).sqrt()
                return torch.stack([radius * angle.cos(), radius * angle.sin()], 1)

            def density(self, xy):
                r = xy.norm(dim=-1)
                area = math.pi * (self.outer**2 - self.inner**2)
                return torch.where((r >= self.inner) & (r < self.outer), 1 / area, 0.0).to(xy.dtype)


        @DATASETS.register("one_file_ring", RingParams, provides=("density",))
        def build(params):
            """A uniform ring around the origin (test-only)."""
            return Ring(params.width)
    ''',
    "methods/evaluation/one_file_metric.py": '''
        """The share of samples within a radius of the support: a metric with an option, added as one file."""

        from orch.api import Params, register_metric


        class NearOptions(Params):
            radius: float = 0.05
            """How far from the support a sample still counts."""


        @register_metric(
            "one_file_near", direction="max", title="share near the support", requires=("density",),
            options_model=NearOptions,
        )
        def near(samples, dataset, evaluation, device, options):
            """Share of samples whose distance to the ring's centre line is within `radius` (test-only)."""
            r = samples.double().cpu().norm(dim=-1)
            return float(((r - 0.6).abs() <= 0.05 + options.radius).double().mean())
    ''',
    "orchestrator/backends/one_file_inline.py": '''
        """Every trial in this process, one after the other: a backend added as one file (test-only)."""

        from typing import Literal

        from orch.api import Backend, BackendParams, read_json, register_backend, run_trial


        class InlineParams(BackendParams):
            name: Literal["one_file_inline"] = "one_file_inline"


        @register_backend("one_file_inline")
        class Inline(Backend):
            """In this process, sequentially (test-only)."""

            Params = InlineParams

            def run(self, trials, study_dir, study, progress, say):
                for trial in trials:
                    progress.started(trial.id)
                    run_trial(trial)
                    progress.finished(trial.id, read_json(trial.dir + "/state.json")["status"])
    ''',
}

STUDY = {
    "name": "one_file",
    "base": {
        "dataset": {"name": "one_file_ring", "width": 0.2},
        "model": {"name": "one_file_net", "width": 16},
        "method": {"name": "one_file_fm"},
        "train": {"steps": 20, "batch_size": 128, "checkpoint_every": 10, "log_every": 10, "device": "cpu"},
        "eval": {
            "every": 20,
            "nfe": [2],
            "num_samples": 500,
            "metrics": ["kl", "one_file_near"],
            "metric_options": {"one_file_near": {"radius": 0.1}},
        },
    },
    "grid": {"train.seed": [0]},
    "backend": {"name": "one_file_inline"},
}

SITECUSTOMIZE = '''
"""Import orch from the scratch copy in this interpreter and every one it starts (they inherit PYTHONPATH)."""
import importlib.util
import sys

ROOTS = {roots!r}


class ScratchCopy:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in ROOTS:
            return importlib.util.spec_from_file_location(
                name, ROOTS[name] + "/__init__.py", submodule_search_locations=[ROOTS[name]]
            )
        return None


sys.meta_path.insert(0, ScratchCopy)
'''


def scratch_copy(tmp_path: Path) -> Path:
    """The repository's tracked and unignored files, copied."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    copy = tmp_path / "repo"
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    return copy


def changed_files(copy: Path, before: dict[str, bytes]) -> list[str]:
    now = {str(p.relative_to(copy)): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    return sorted(name for name in now.keys() | before.keys() if now.get(name) != before.get(name))


def test_a_method_network_dataset_metric_and_backend_are_one_file_each(tmp_path):
    copy = scratch_copy(tmp_path)
    boot = tmp_path / "boot"
    boot.mkdir()
    roots = {name: str(copy / folder) for name, folder in FOLDERS.items()}
    (boot / "sitecustomize.py").write_text(SITECUSTOMIZE.format(roots=roots))
    env = {**os.environ, "PYTHONPATH": str(boot)}
    before = {str(p.relative_to(copy)): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    for name, source in NEW_FILES.items():
        (copy / name).write_text(textwrap.dedent(source).lstrip())

    def orch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orch.cli", *args], cwd=copy, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip

    described = orch("describe")
    assert described.returncode == 0, described.stderr
    listed = ("method.name: one_file_fm", "model.name: one_file_net", "dataset.name: one_file_ring", "`one_file_near`",
              "eval.metric_options.one_file_near.radius", "backend.name: one_file_inline")  # fmt: skip
    for name in listed:
        assert name in described.stdout, name
    study = copy / "one_file.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    submitted = orch("submit", str(study), "--workdir", str(tmp_path / "runs"))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    (trial,) = (tmp_path / "runs" / "one_file" / "trials").iterdir()
    state = json.loads((trial / "state.json").read_text())
    assert state["status"] == "completed" and 0 <= state["result"]["eval/one_file_near/nfe_2"] <= 1
    config = json.loads((trial / "trial.json").read_text())["config"]
    assert config["eval"]["metric_options"] == {"one_file_near": {"radius": 0.1}}
    docs = subprocess.run([sys.executable, "-m", "orch.study.describe"], cwd=copy, env=env, capture_output=True,
                          text=True)  # fmt: skip  # `make docs`: the one generated file
    assert docs.returncode == 0 and "rewritten" in docs.stdout, docs.stderr
    study.unlink()
    assert changed_files(copy, before) == sorted(["docs/reference.md", *NEW_FILES])
    fast = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "not slow", "-q", "-x", "-p", "no:cacheprovider", "-n", "2"],
        cwd=copy, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert fast.returncode == 0, fast.stdout[-3000:] + fast.stderr[-2000:]
