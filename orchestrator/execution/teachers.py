"""Teachers of distillation methods (sdei, sdee, stei with a teacher, scd, fmm, ayf), autoguidance's weak
teachers and prior stages (TCM's stage 1, CMT's mid-training): named by the study, or planned.

A teacher the study does not name is a flow-matching model of the trial's dataset and network, trained with the
budget of `method.teacher`. It is a trial of its own, planned with the study (its id is the hash of its config,
`orch plan` lists it), trained first by the driver on the study's backend, at most once per workdir (a second
study that needs it finds it trained, or waits for the driver training it), tracked in the MLflow experiment
`orch-teachers`, and then loaded by every trial that asks for the same one:

    <workdir>/teachers/trials/<hash>/   state.json, checkpoints/, teacher.pt (config + EMA weights)

A prior stage is planned the same way: a trial of the stage's method (itself distilling the planned teacher, so
the chain teacher → stage → student is trained in that order, each step once and resumable), whose teacher file
the student starts from.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from torch import nn

from orch.execution.build import GUIDANCE_EMBEDDERS, build_network, needs_teacher, prior_stage, read_weights
from orch.problems import Problem
from orch.trial.config import resolve_trial_config
from orch.trial.state import atomic_write_bytes, load_latest_checkpoint
from orch.trial.typed import TrialConfig

EXPERIMENT = "orch-teachers"
TEACHER_FILE = "teacher.pt"


class TeacherError(Exception):
    """A teacher that cannot be loaded or trained; names the path and what is wrong."""


def teacher_config(config: dict, steps: int | None = None, model: dict | None = None) -> dict:
    """The flow-matching trial that trains the default teacher of `config`: same dataset and network, the budget
    of method.teacher (for `steps` instead and with the network options `model` changed when given: autoguidance's
    weak teacher), evaluated once at the end with the student's metrics."""
    spec = config["method"]["teacher"] | ({} if steps is None else {"steps": steps})
    train = {k: spec[k] for k in ("steps", "batch_size", "lr", "lr_decay_steps", "seed")}
    train |= {"ema": [spec["ema"]], "checkpoint_every": max(1, spec["steps"] // 4)}
    train["label_dropout"] = config["train"]["label_dropout"]  # a conditional teacher learns the null class too
    # the teacher is measured unguided: a student's guidance scales may need step counts two-pass CFG cannot reach
    evaluation = config["eval"] | {"every": spec["steps"], "ema": None, "guidance": [1.0], "guidance_interval": None}
    raw = {
        "dataset": config["dataset"],
        "model": config["model"] | (model or {}),
        "method": {"name": "fm"},
        "time_sampler": {"name": "uniform"},
        "train": train,
        "eval": evaluation,
    }
    resolved, problems = resolve_trial_config(raw)
    if problems:
        whose = "the teacher's" if steps is None else "autoguidance's weak teacher's (method.autoguide)"
        raise TeacherError(f"cannot build {whose} config: " + "; ".join(map(str, problems)))
    return resolved


def load_teacher(path: str | Path, student: dict | None = None) -> tuple[nn.Module, dict]:
    """A teacher network and its config from a teacher file, a trial directory (newest checkpoint, first EMA
    copy), or, for a `student` config whose network loads them (model dit), a DiT/SiT repository checkpoint:
    the teacher is then the student's network as a flow-matching model with those weights. Raises TeacherError
    naming the path and the expected format."""
    path = Path(path)
    expected = (
        f"expected an orch teacher file ({TEACHER_FILE}), a trial directory with trial.json and checkpoints/, or "
        "for model dit a checkpoint of the DiT/SiT repositories"
    )
    try:
        if path.is_dir():
            config = json.loads((path / "trial.json").read_text())["config"]
            checkpoint = load_latest_checkpoint(path)
            if checkpoint is None:
                raise TeacherError(f"teacher {path}: no readable checkpoint in {path / 'checkpoints'}")
            state = checkpoint["trainer"]["ema"][str(config["train"]["ema"][0])]
        elif "config" in (saved := read_weights(path)):
            config, state = saved["config"], saved["net"]
        elif student is not None:  # another code base's checkpoint, for the student's own network
            config = teacher_config(student)
            net = build_network(TrialConfig.parse(config))
            if not hasattr(net, "load_pretrained"):
                raise TeacherError(f"teacher {path}: a state dict without orch's config; {expected}")
            net.load_pretrained(saved, str(path))
            return net, config
        else:
            raise TeacherError(f"teacher {path}: a state dict without orch's config; {expected}")
        net = build_network(TrialConfig.parse(config))
        net.load_state_dict(state)
        return net, config
    except TeacherError:
        raise
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        raise TeacherError(f"teacher {path}: cannot load ({type(e).__name__}: {first_line}); {expected}") from None


def planned_teacher(config: dict) -> dict | None:
    """The config of the teacher trial that `config` distils when the study names none, else None."""
    method = config["method"]
    if not needs_teacher(method) or method["teacher"]["path"] is not None:
        return None
    return teacher_config(config)


def planned_guide(config: dict) -> dict | None:
    """The config of autoguidance's weak teacher trial when `config` asks for one and names no file, else None."""
    autoguide = config["method"].get("autoguide")
    if not needs_teacher(config["method"]) or autoguide is None or autoguide["path"] is not None:
        return None
    return teacher_config(config, autoguide["steps"], autoguide.get("model"))


def planned_stage(config: dict) -> dict | None:
    """The config of the prior stage trial that `config` starts from when it names no trained stage, else None:
    the trial's dataset, network and train section with the stage's method, trained for the stage's steps and
    evaluated once at the end with the trial's metrics."""
    stage = prior_stage(config["method"])
    if stage is None or stage[1]["path"] is not None:
        return None
    key, spec, method = stage
    steps = spec["steps"]
    train = config["train"] | {"steps": steps, "ema": [config["train"]["ema"][0]]}
    train["checkpoint_every"] = max(1, steps // 4)
    raw = {
        "dataset": config["dataset"],
        "model": config["model"],
        "method": method,
        "time_sampler": {"name": "auto"},
        "train": train,
        "eval": config["eval"] | {"every": steps, "ema": None},
    }
    resolved, problems = resolve_trial_config(raw)
    if problems:
        raise TeacherError(f"cannot build the config of method.{key}: " + "; ".join(map(str, problems)))
    return resolved


def write_teacher_file(trial_dir: Path, config: dict) -> Path:
    """The teacher file of a completed teacher trial: its config and its first EMA copy's weights."""
    checkpoint = load_latest_checkpoint(trial_dir)
    weights = checkpoint["trainer"]["ema"][str(config["train"]["ema"][0])]
    buffer = io.BytesIO()
    torch.save({"config": config, "net": weights}, buffer)
    atomic_write_bytes(trial_dir / TEACHER_FILE, buffer.getvalue())
    return trial_dir / TEACHER_FILE


def named_file_problems(config: dict) -> list[Problem]:
    """The teacher, weak teacher and prior stage files a trial's study names, when missing or not what the trial
    needs: another dataset, another method for a stage, or, for a file the trial starts from, another network.
    Checked where the study is submitted, before anything runs (a study for a cluster validates anywhere)."""
    method, named = config["method"], []
    for key in ("teacher", "autoguide"):
        if (spec := method.get(key)) and spec["path"] is not None:
            named.append((f"method.{key}.path", spec["path"], None, key == "teacher" and method["init_from_teacher"]))
    if (stage := prior_stage(method)) is not None and stage[1]["path"] is not None:
        named.append((f"method.{stage[0]}.path", stage[1]["path"], stage[2]["name"], True))
    problems = []
    for where, path, method_name, starts_from in named:
        try:
            mismatch = named_file_mismatch(Path(path), config, method_name, starts_from)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            mismatch = f"{path}: cannot read ({type(e).__name__}: {str(e).strip()[:200]})"
        if mismatch is not None:
            problems.append(Problem(where, mismatch))
    return problems


def named_file_mismatch(path: Path, config: dict, method_name: str | None, starts_from: bool) -> str | None:
    """What makes the teacher file or trial directory `path` unfit for the trial of `config`, else None."""
    if not path.exists():
        return f"no such file or directory: {path}"
    if path.is_dir():
        saved = json.loads((path / "trial.json").read_text())["config"]
        checkpoint = load_latest_checkpoint(path)
        if checkpoint is None:
            return f"{path}: no readable checkpoint in {path / 'checkpoints'}"
        weights = checkpoint["trainer"]["ema"][str(saved["train"]["ema"][0])]
    else:
        file = read_weights(path)
        if "config" not in file:  # another code base's checkpoint: its network loads it, or the trial fails
            return None
        saved, weights = file["config"], file["net"]
    if method_name is not None and saved["method"]["name"] != method_name:
        return f"{path} holds a {saved['method']['name']!r} trial; this stage must be a {method_name!r} one"
    theirs, ours = saved["dataset"], config["dataset"]
    if theirs["name"] != ours["name"] or theirs.get("conditional", False) != ours.get("conditional", False):
        return f"{path} was trained on dataset {show_dataset(theirs)}, this trial's is {show_dataset(ours)}"
    if starts_from:
        parsed = TrialConfig.parse(config)
        dataset = parsed.build("dataset")
        with torch.device("meta"):  # shapes only: nothing is allocated
            shapes = {k: tuple(v.shape) for k, v in build_network(parsed, dataset).state_dict().items()}
        differ = [k for k in sorted(set(shapes) | set(weights)) if shapes.get(k) != shape_of(weights.get(k))]
        differ = [k for k in differ if not (k.startswith(GUIDANCE_EMBEDDERS) and k not in weights)]
        if differ:
            first = differ[0]
            detail = f"{first}: {shape_of(weights.get(first)) or 'absent'} in the file, "
            detail += f"{shapes.get(first) or 'absent'} in this trial's model"
            return f"{path}: the trial starts from it but its network differs ({len(differ)} tensor(s); {detail})"
    return None


def shape_of(tensor) -> tuple | None:
    return None if tensor is None else tuple(tensor.shape)


def show_dataset(section: dict) -> str:
    return repr(section["name"]) + (" (class-conditional)" if section.get("conditional") else "")
