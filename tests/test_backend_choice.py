"""Switching a study to another backend from the command line (`--backend`, `backend.name=`), the study's
`backends.NAME` variants, per-user cluster profiles (`--cluster`), every sbatch option a cluster needs, and the
job script `orch plan` shows. Wiring only: the jobs themselves run in tests/test_slurm.py."""

from pathlib import Path

import pytest
import yaml

from orch.backends.slurm import SlurmParams
from orch.cli import main
from orch.problems import StudyError
from orch.study.load import parse_study
from tests.test_hardening import run_cli
from tests.test_study import shipped_profiles

ROOT = Path(__file__).resolve().parent.parent
RAY_STUDY = """
name: switch
base: {train: {steps: 10}}
backend: {name: ray, max_concurrent: 2, resources: {cpu: 1}}
backends:
  slurm: {cpus_per_task: 4, timeout_min: 60, account: study_account}
"""


def switched(*overrides: str, backend: str | None = None, cluster=None, text: str = RAY_STUDY):
    pairs = dict(o.split("=", 1) for o in overrides)
    return parse_study(text, "switch.yaml", None, {k: yaml.safe_load(v) for k, v in pairs.items()}, backend, cluster)


def test_backend_replaces_the_files_section_with_its_variant_and_overrides_apply_to_the_result():
    study = switched("backend.partition=gpu", backend="slurm")
    assert study.backend == SlurmParams(partition="gpu", cpus_per_task=4, timeout_min=60, account="study_account")
    assert switched("backend.name=slurm", "backend.qos=high").backend.qos == "high"  # the same switch
    assert switched().backend.max_concurrent == 2  # no switch: the file's section
    assert switched(backend="local").backend.name == "local"  # no variant: the backend's defaults


@pytest.mark.parametrize(
    "overrides, backend, expected",
    [
        (["backend.max_concurrent=3"], "slurm", "backend.max_concurrent: unknown key 'max_concurrent' for backend "),
        (["backend.name=slurm"], "ray", "backend.name: different backends asked for: --backend 'ray', backend.name"),
        (["backend.additional_parameters={array: 0-3}"], "slurm", "sbatch --array is set by orch"),
        (["backend.additional_parameters={mail-typ: END}"], "slurm", "(did you mean 'mail-type'?)"),
        (["backend.additional_parameters={time: 5}"], "slurm", "use backend.timeout_min"),
        (['backend.setup=["module load a\\nrm -rf x"]'], "slurm", "must be one non-empty line"),
    ],
)
def test_a_bad_backend_option_is_one_problem_at_the_command_line(overrides, backend, expected):
    with pytest.raises(StudyError) as e:
        switched(*overrides, backend=backend)
    assert len(e.value.problems) == 1 and expected in str(e.value.problems[0])
    assert e.value.problems[0].line in (0, None)  # the file's lines are not where it was written


def test_a_typo_in_a_variant_is_reported_whichever_backend_runs(capsys):
    text = RAY_STUDY.replace("timeout_min: 60", "timeout_mn: 60")
    with pytest.raises(StudyError) as e:
        switched(text=text)
    (problem,) = e.value.problems
    assert (
        problem.path == "backends.slurm.timeout_mn"
        and problem.line == 6
        and "did you mean 'timeout_min'" in str(problem)
    )


def write_clusters(tmp_path: Path, monkeypatch, text: str) -> Path:
    path = tmp_path / "clusters.yaml"
    path.write_text(text)
    monkeypatch.setenv("ORCH_CLUSTERS", str(path))
    return path


def test_a_cluster_profile_lies_under_the_study_and_the_command_line_on_top(tmp_path, monkeypatch, capsys):
    write_clusters(tmp_path, monkeypatch, "booster:\n  {name: slurm, account: lab, qos: normal, partition: booster,"
                                          " cpus_per_task: 2, setup: ['module load CUDA/12.4']}\n")  # fmt: skip
    study = tmp_path / "switch.yaml"
    study.write_text(RAY_STUDY)
    assert main(["plan", str(study), "--cluster", "booster", "backend.qos=high", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for line in ("--account=study_account", "--qos=high", "--partition=booster", "--cpus-per-task=4", "--time=60"):
        assert f"#SBATCH {line}\n" in out, line  # the study's own options win over the cluster's
    assert "\nmodule load CUDA/12.4\n" in out and str(tmp_path / "switch" / "slurm") in out


@pytest.mark.parametrize(
    "clusters, args, expected",
    [
        (None, ["--cluster", "booster"], "cannot read the cluster profiles"),
        ("booster: {name: slurm}\n", ["--cluster", "boster"], "no cluster 'boster' (did you mean 'booster'?)"),
        ("booster: {name: slurm, acount: x}\n", ["--cluster", "booster"], "unknown key 'acount'"),
        ("booster: {name: slurm}\n", ["--cluster", "booster", "--backend", "ray"], "different backends asked for"),
    ],
)
def test_a_bad_cluster_profile_exits_2_naming_it(tmp_path, monkeypatch, capsys, clusters, args, expected):
    path = write_clusters(tmp_path, monkeypatch, clusters) if clusters else tmp_path / "none.yaml"
    monkeypatch.setenv("ORCH_CLUSTERS", str(path))
    study = tmp_path / "switch.yaml"
    study.write_text(RAY_STUDY)
    assert run_cli(["validate", str(study), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") <= 2 and "Traceback" not in err


def slurm_variants() -> list[tuple[str, str | None]]:
    """The shipped studies with a Slurm variant, with each profile."""
    return [(s, p) for s, p in shipped_profiles() if "slurm" in yaml.safe_load((ROOT / "studies" / s).read_text())
            .get("backends", {})]  # fmt: skip


@pytest.mark.parametrize("study, profile", slurm_variants())
def test_every_shipped_gpu_study_plans_on_slurm_with_each_profile(study, profile, capsys):
    args = ["plan", str(ROOT / "studies" / study), "--backend", "slurm"] + (["--profile", profile] if profile else [])
    assert main(args) == 0, capsys.readouterr().err
    assert "#SBATCH --array=" in capsys.readouterr().out


def test_gpu_check_on_slurm_asks_one_gpu_per_trial_and_eight_on_the_full_recipe(capsys):
    study = str(ROOT / "studies" / "imagenet256_secant.yaml")
    assert main(["plan", study, "--backend", "slurm", "--profile", "gpu_check"]) == 0
    check = capsys.readouterr().out
    assert "#SBATCH --gpus-per-node=1\n" in check and "#SBATCH --ntasks-per-node=1\n" in check
    assert main(["plan", study, "--backend", "slurm"]) == 0
    full = capsys.readouterr().out
    assert "#SBATCH --gpus-per-node=8\n" in full and "#SBATCH --ntasks-per-node=8\n" in full
    assert len(yaml.safe_load(Path(study).read_text())["backends"]) == 1


def test_a_dry_run_makes_every_check_a_submission_makes_and_creates_nothing(tmp_path, capsys):
    """The preflights of a real submission: input files, the work directory, the backend's surroundings."""
    tiny, workdir = str(ROOT / "tests" / "studies" / "tiny.yaml"), tmp_path / "work"
    assert main(["submit", tiny, "--dry-run", "--workdir", str(workdir)]) == 0
    assert "(dry run: every check a submission makes passed; backend ray" in capsys.readouterr().out
    missing = tmp_path / "cifar10.npz"
    assert main(["submit", tiny, f"eval.fid_statistics={missing}", "--dry-run", "--workdir", str(workdir)]) == 2
    assert f"eval.fid_statistics: no such file: {missing}" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main(["submit", tiny, "--dry-run", "--workdir", str(tmp_path / "afile" / "w")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert not workdir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
