"""Adding a built-in component is one file. In a scratch copy of the repository, one new file each adds a method,
a network, a dataset, a metric with an option of its own and a backend (the network and the dataset are the plugin
test's, as built-in files); with no other file changed, `orch describe` lists them, a study naming all five runs
through the CLI, the regenerated option reference documents them, and the fast tests that range over the
registries pass."""

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

from tests.test_extending import RESIDUAL, RING

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"orch": "orchestrator", "orch.methods": "methods", "orch.dashboards": "dashboards"}

pytestmark = pytest.mark.slow

BUILT_IN_IMPORTS = {
    "from orch.api import DATASETS, Density2D, Params": "from orch.methods.contracts.registry import Params\n"
    "from orch.methods.data.base import DATASETS, Density2D",
    "from orch.api import MODELS, Params": "from orch.methods.contracts.registry import Params\n"
    "from orch.methods.networks.base import MODELS",
}
"""A built-in file imports from its own layer (tests/test_layers.py); only plugins import orch.api."""


def as_built_in(plugin_source: str) -> str:
    for plugin, built_in in BUILT_IN_IMPORTS.items():
        plugin_source = plugin_source.replace(plugin, built_in)
    assert "orch.api" not in plugin_source
    return plugin_source


NEW_FILES = {
    "methods/losses/one_file_fm.py": '''
        """Flow matching sampled with the explicit midpoint rule: a method added as one file (test-only)."""

        import torch

        from orch.methods.contracts.method import Method, MethodParams, register_method
        from orch.methods.contracts.time_samplers import TimeSamplerParams, Uniform
        from orch.methods.losses.flow_matching import diagonal_term


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
    "methods/networks/residual.py": as_built_in(RESIDUAL),
    "methods/data/ring.py": as_built_in(RING),
    "methods/evaluation/one_file_metric.py": '''
        """The share of samples within a radius of the support: a metric with an option, added as one file."""

        from orch.methods.contracts.registry import Params
        from orch.methods.evaluation.metric import register_metric


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

        from pathlib import Path
        from typing import Literal

        from orch.backends.base import Backend, BackendParams, register_backend
        from orch.execution.runner import run_trial
        from orch.trial.state import read_json


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
                    progress.finished(trial.id, read_json(Path(trial.dir) / "state.json")["status"])
    ''',
}

STUDY = {
    "name": "one_file",
    "base": {
        "dataset": {"name": "ring", "width": 0.2},
        "model": {"name": "residual", "width": 16},
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

REGISTRY_TESTS = [
    "tests/test_describe.py",  # the option reference
    "tests/test_layers.py",  # the new files' imports
    "tests/test_docs.py",
    "tests/test_stopgrad_and_cost.py",  # every method's declared passes
    "tests/test_guidance.py",  # every method, conditionally
    "tests/test_precision.py",  # every method, under each precision
]
"""The fast tests whose outcome depends on which components are registered (those that range over registries):
of these files, every test of the first three and the cases of the new method in the others (the cases of the
built-in methods run in the suite itself). The whole fast tier in such a copy also passes (run by hand when
this test was written); here it would add minutes to the suite."""
REGISTRY_SELECTION = "test_describe or test_layers or test_docs or one_file_fm"

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


def git(copy: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=copy, capture_output=True, text=True, check=True).stdout


def scratch_copy(tmp_path: Path) -> Path:
    """The repository's tracked and unignored files, copied and committed in a repository of their own."""
    listed = git(ROOT, "ls-files", "-co", "--exclude-standard", "-z")
    copy = tmp_path / "repo"
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    git(copy, "init", "-q")
    git(copy, "add", "-A")
    git(copy, "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-q", "-m", "scratch copy")
    return copy


def changed_files(copy: Path) -> list[str]:
    """Files added or changed since the scratch copy was committed."""
    return sorted(line[3:] for line in git(copy, "status", "--porcelain", "--untracked-files=all").splitlines())


def test_a_method_network_dataset_metric_and_backend_are_one_file_each(tmp_path):
    copy = scratch_copy(tmp_path)
    boot = tmp_path / "boot"
    boot.mkdir()
    roots = {name: str(copy / folder) for name, folder in FOLDERS.items()}
    (boot / "sitecustomize.py").write_text(SITECUSTOMIZE.format(roots=roots))
    env = {**os.environ, "PYTHONPATH": str(boot)}
    for name, source in NEW_FILES.items():
        (copy / name).write_text(textwrap.dedent(source).lstrip())

    def orch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orch.cli", *args], cwd=copy, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip

    described = orch("describe")
    assert described.returncode == 0, described.stderr
    listed = ("method.name: one_file_fm", "model.name: residual", "dataset.name: ring", "`one_file_near`",
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
    assert changed_files(copy) == sorted(["docs/reference.md", *NEW_FILES])
    fast = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "not slow", "-v", "-x", "-p", "no:cacheprovider",
         "-k", REGISTRY_SELECTION, *REGISTRY_TESTS],
        cwd=copy, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert fast.returncode == 0, fast.stdout[-3000:] + fast.stderr[-2000:]
    new_cases = [line for line in fast.stdout.splitlines() if "one_file_fm" in line and "PASSED" in line]
    assert len(new_cases) >= 3 + 1 + 2, fast.stdout[-3000:]  # 3 precisions, conditional training, 2 batch sizes
