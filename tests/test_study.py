"""Study files: expansion, profiles, stable trial ids, and invalid input rejected with exit 2, nothing on disk."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orch.cli import main
from orch.problems import StudyError
from orch.study.load import load_study, parse_study
from orch.trial.spec import level_label, show_factor

ROOT = Path(__file__).resolve().parent.parent
MAIN_STUDY = ROOT / "studies" / "ablation_stopgrad.yaml"


def test_main_study_expands_every_defined_placement():
    study = load_study(MAIN_STUDY)
    pairs = {(t.factors["method.name"], t.factors["method.stopgrad"]) for t in study.trials}
    assert pairs == {
        ("lsd", "convex"),
        ("lsd", "none"),
        ("esd", "full"),
        ("esd", "convex"),
        ("esd", "none"),
        ("psd_mid", "convex"),
        ("psd_mid", "none"),
        ("psd_unif", "convex"),
        ("psd_unif", "none"),
    }
    assert len(study.trials) == 18 and len({t.id for t in study.trials}) == 18


def test_trial_ids_are_stable_and_follow_the_config():
    first, again = load_study(MAIN_STUDY), load_study(MAIN_STUDY)
    assert [t.id for t in first.trials] == [t.id for t in again.trials]
    smoke = load_study(MAIN_STUDY, "smoke")
    assert len(smoke.trials) == 9  # the profile replaces the seed axis with [0]
    assert not {t.id for t in smoke.trials} & {t.id for t in first.trials}  # fewer steps: other trials
    assert all(t.config["train"]["steps"] == 200 for t in smoke.trials)


def test_defaults_are_filled_and_profiles_set_backend_keys():
    study = parse_study("name: s\nprofiles: {big: {backend.max_concurrent: 8, train.steps: 7}}\n", "s.yaml", "big")
    (trial,) = study.trials
    assert trial.config["method"] == {"name": "lsd", "stopgrad": "convex", "diag_fraction": 0.75}
    assert trial.config["train"]["steps"] == 7 and study.backend.max_concurrent == 8


INVALID = {
    "unknown method": ("name: s\nbase: {method: {name: lsdd}}\n", ["method.name", "did you mean 'lsd'"]),
    "wrong type": ("name: s\nbase: {train: {steps: ten}}\n", ["train.steps", "integer"]),
    "unknown key": ("name: s\nbase: {train: {stepz: 3}}\n", ["train.stepz", "did you mean 'steps'"]),
    "negative batch size": ("name: s\nbase: {train: {batch_size: -4}}\n", ["train.batch_size", "greater than 0"]),
    "empty axis": ("name: s\ngrid: {train.seed: []}\n", ["grid.train.seed", "empty"]),
    "not YAML": ("name: s\nbase: {train: [1, 2\n", ["not valid YAML"]),
    "python tag": ("name: s\nbase: !!python/object/apply:os.system [touch /tmp/pwned]\n", ["unsupported YAML tag"]),
    "undefined stopgrad": ("name: s\ngrid: {method.stopgrad: [full]}\n", ["grid.method.stopgrad", "exclude"]),
    "everything excluded": (
        "name: s\ngrid: {train.seed: [0]}\nexclude: [{train.seed: 0}]\n",
        ["every combination is excluded"],
    ),
    "duplicate key": ("name: s\nbase: {}\nbase: {}\n", ["duplicate key"]),
    "not a mapping": ("- just\n- a list\n", ["mapping"]),
    "unknown profile": ("name: s\nprofiles: {smoke: {}}\n", ["did you mean 'smoke'"]),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_study_exits_2_naming_the_problem_and_writes_nothing(case, tmp_path, capsys):
    text, expected = INVALID[case]
    path = tmp_path / "study.yaml"
    path.write_text(text)
    workdir = tmp_path / "runs"
    argv = ["submit", str(path), "--workdir", str(workdir)] + (
        ["--profile", "smok"] if case == "unknown profile" else []
    )
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for fragment in expected:
        assert fragment in err, err
    assert "Traceback" not in err
    assert not workdir.exists()
    assert not Path("/tmp/pwned").exists()


def test_all_problems_are_reported_together_with_lines():
    text = "name: s\nbase:\n  train: {steps: 0}\n  model: {wdth: 3}\ngrid:\n  method.name: [lsd, nope]\n"
    with pytest.raises(StudyError) as info:
        parse_study(text, "s.yaml")
    report = info.value.report()
    assert "base.train.steps (line 3)" in report
    assert "base.model.wdth (line 4)" in report
    assert "grid.method.name (line 6)" in report


def test_console_script_validate_and_plan():
    orch = [sys.executable, "-m", "orch.cli"]
    ok = subprocess.run([*orch, "validate", str(MAIN_STUDY)], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "18 trial(s)" in ok.stdout
    plan = subprocess.run([*orch, "plan", str(MAIN_STUDY), "--profile", "smoke"], capture_output=True, text=True)
    assert plan.returncode == 0 and plan.stdout.count("psd_unif") == 2
    bad = subprocess.run([*orch, "validate", str(MAIN_STUDY), "--profile", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no profile 'nope'" in bad.stderr


def test_plan_shows_section_axes_as_pairs_and_ends_quietly_on_a_closed_pipe():
    orch = [sys.executable, "-m", "orch.cli", "plan", str(ROOT / "studies" / "all_methods_checkerboard.yaml")]
    plan = subprocess.run([*orch, "--profile", "smoke"], capture_output=True, text=True, cwd=ROOT)
    assert plan.returncode == 0 and "name=stei num_steps=None target=teacher" in plan.stdout
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `orch plan ... | head` once head has exited
    closed = subprocess.run([*orch, "--profile", "smoke"], stdout=write_end, stderr=subprocess.PIPE, cwd=ROOT)
    os.close(write_end)
    assert closed.returncode == 141 and closed.stderr.decode() == ""  # 128 + SIGPIPE, as Unix tools end


def shipped_profiles() -> list[tuple[str, str | None]]:
    cases = []
    for path in sorted((ROOT / "studies").glob("*.yaml")):
        profiles = (yaml.safe_load(path.read_text()).get("profiles") or {}).keys()
        cases += [(path.name, None)] + [(path.name, name) for name in profiles]
    return cases


@pytest.mark.parametrize("study, profile", shipped_profiles())
def test_every_shipped_study_and_profile_validates_and_plans(study, profile, capsys):
    """Studies for GPU clusters included: each plans here (validation, NFE reachability, teachers)."""
    args = ["plan", str(ROOT / "studies" / study)] + (["--profile", profile] if profile else [])
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "trial(s)" in out
    assert "{'" not in out, out  # a nested section of a level shows dotted keys, never a Python dict


def test_a_level_with_nested_sections_is_labelled_with_dotted_keys():
    level = {"name": "sdei", "teacher": {"steps": 400, "lr": 0.001}, "num_steps": None}
    assert level_label(level) == "sdei teacher.steps=400 teacher.lr=0.001 num_steps=None"
    assert show_factor(level) == "name=sdei teacher.steps=400 teacher.lr=0.001 num_steps=None"
    assert level_label({"name": "meanflow", "adaptive_p": 0.0}) == "meanflow adaptive_p=0.0"  # values as written
    assert show_factor(0.00123456, "lr") == "lr=0.001235" and level_label(0.00123456) == "0.001235"


def test_a_section_valued_level_does_not_take_a_later_axis_of_the_same_section(tmp_path):
    study = tmp_path / "sections.yaml"
    study.write_text(
        "name: sections\n"
        "grid:\n"
        "  method: [{name: sdei, teacher: {steps: 10}}, {name: stee}]\n"
        "  method.num_steps: [1, 2]\n"
    )
    trials = load_study(study).trials
    assert [t.config["method"]["num_steps"] for t in trials] == [1, 2, 1, 2]
    assert [t.factors["method"] for t in trials] == [{"name": "sdei", "teacher": {"steps": 10}}] * 2 + [
        {"name": "stee"}
    ] * 2  # the levels as written: no num_steps carried in from the next axis


def test_a_count_as_a_power_of_ten_and_one_step_count_are_what_they_mean_on_the_command_line():
    from orch.cli.common import parse_overrides

    overrides = parse_overrides(["train.steps=1e3", "eval.nfe=4", "train.lr=1e-3", "train.max_loss=5E+2"])
    study = load_study(ROOT / "tests" / "studies" / "tiny.yaml", overrides=overrides)
    assert {t.config["train"]["steps"] for t in study.trials} == {1000}
    assert {tuple(t.config["eval"]["nfe"]) for t in study.trials} == {(4,)}
    assert study.trials[0].config["train"]["lr"] == 1e-3 and study.trials[0].config["train"]["max_loss"] == 500
    with pytest.raises(StudyError) as refused:  # not a whole number: still refused
        load_study(ROOT / "tests" / "studies" / "tiny.yaml", overrides=parse_overrides(["train.steps=1.5e3"]))
    assert "valid integer (got 1500.0)" in str(refused.value.problems[0])


def test_a_missing_study_file_and_a_misspelt_study_name_are_one_line_each(tmp_path, capsys):
    from tests.test_hardening import run_cli

    assert run_cli(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: cannot read the study file {tmp_path / 'missing.yaml'}: No such file or directory\n"
    )
    (tmp_path / "tiny" / "trials").mkdir(parents=True)
    assert run_cli(["status", "tinny", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no submitted study 'tinny'" in err and "(did you mean 'tiny'?)" in err
