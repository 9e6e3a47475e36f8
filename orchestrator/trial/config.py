"""One trial's configuration: validated through the registries and resolved to a complete, hashable dict."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from orch.methods.catalog import DATASETS, METHODS, METRICS, MODELS, TIME_SAMPLERS
from orch.methods.contracts.interpolants import LinearInterpolant
from orch.methods.contracts.method import Setting
from orch.methods.contracts.registry import Registry, UnknownName
from orch.methods.evaluation import fid
from orch.methods.evaluation.generation import LABEL_SEED, sampler_calls
from orch.methods.runtime.attention import jvp_kernel_problem
from orch.methods.training.trainer import EvalConfig, TrainConfig
from orch.problems import Problem, did_you_mean, pydantic_problems

# Sections chosen by name from a registry, with the default name when a study leaves the section out.
REGISTRY_SECTIONS: dict[str, tuple[Registry, str]] = {
    "dataset": (DATASETS, "checkerboard"),
    "model": (MODELS, "mlp"),
    "method": (METHODS, "lsd"),
    "time_sampler": (TIME_SAMPLERS, "auto"),
}
FIXED_SECTIONS: dict[str, type[BaseModel]] = {"train": TrainConfig, "eval": EvalConfig}
SECTIONS = [*REGISTRY_SECTIONS, *FIXED_SECTIONS]


def validate_section(section: str, raw: Any, model: type[BaseModel], context: str) -> tuple[dict, list[Problem]]:
    if not isinstance(raw, dict):
        return {}, [Problem(section, f"must be a mapping, got {type(raw).__name__}")]
    try:
        return model.model_validate(raw).model_dump(), []
    except ValidationError as e:
        return {}, pydantic_problems(e, section, model, context)


def resolve_trial_config(raw: Any) -> tuple[dict, list[Problem]]:
    """Validate a (possibly partial) trial config; return it with every default filled in, or the problems."""
    if not isinstance(raw, dict):
        return {}, [Problem("base", f"must be a mapping, got {type(raw).__name__}")]
    problems = [
        Problem(str(key), f"unknown section{did_you_mean(str(key), SECTIONS)}; known: {', '.join(SECTIONS)}")
        for key in raw
        if key not in SECTIONS
    ]
    resolved: dict[str, dict] = {}
    named, valid = set(), set()  # sections whose component is known, and sections that are valid as a whole
    for section, (registry, default) in REGISTRY_SECTIONS.items():
        value = raw.get(section) or {}
        name = value.get("name", default) if isinstance(value, dict) else default
        try:
            entry = registry.get(name)
        except UnknownName as e:
            problems.append(Problem(f"{section}.name", str(e)))
            continue
        params = {k: v for k, v in value.items() if k != "name"} if isinstance(value, dict) else value
        if section == "dataset" and isinstance(params, dict) and "conditional" in params:
            if "classes" not in entry.provides:  # clearer than "extra inputs are not permitted"
                labelled = ", ".join(n for n in DATASETS.names() if "classes" in DATASETS.get(n).provides)
                problems.append(
                    Problem(
                        "dataset.conditional", f"dataset {name!r} has no class labels; datasets with labels: {labelled}"
                    )
                )
                continue
        named.add(section)
        resolved[section], found = validate_section(section, params, entry.params, f"{registry.kind} {name!r}")
        resolved[section] = {"name": name, **resolved[section]}
        problems += found
        valid |= set() if found else {section}
    for section, model in FIXED_SECTIONS.items():
        resolved[section], found = validate_section(section, raw.get(section) or {}, model, section)
        problems += found
        valid |= set() if found else {section}
    problems += cross_checks(resolved, named, valid)  # the checks whose sections are valid: all in one pass
    if not problems and resolved["train"]["dim_reduction"] == "auto":  # recorded as what it means
        resolved["train"]["dim_reduction"] = METHODS.get(resolved["method"]["name"]).params.reference_reduction
    return resolved, problems


def takes_a_list(base: dict, key: str) -> bool:
    """Whether the dotted option `key` (e.g. eval.nfe, model.channel_mult) is itself a list, for the trial
    config `base`: then a list on the command line sets it rather than making a grid axis."""
    section, _, field = key.partition(".")
    if section in FIXED_SECTIONS:
        model = FIXED_SECTIONS[section]
    elif section in REGISTRY_SECTIONS:
        registry, default = REGISTRY_SECTIONS[section]
        name = (base.get(section) or {}).get("name", default) if isinstance(base.get(section), dict | None) else default
        if name not in registry:
            return False
        model = registry.get(name).params
    else:
        return False
    info = model.model_fields.get(field)
    return info is not None and "list[" in str(info.annotation)


def cross_checks(config: dict, named: set[str], valid: set[str]) -> list[Problem]:
    """Constraints between sections, each checked when the sections it reads are valid (`named`: the registry
    sections whose component is known; `valid`: the sections without problems)."""
    problems = []
    train, evaluation = config.get("train"), config.get("eval")
    if "train" in valid and train["batch_size"] % train["micro_batches"]:
        problems.append(
            Problem(
                "train.micro_batches",
                f"{train['micro_batches']} does not divide train.batch_size {train['batch_size']}",
            )
        )
    if {"train", "eval"} <= valid and evaluation["ema"] is not None and evaluation["ema"] not in train["ema"]:
        problems.append(Problem("eval.ema", f"{evaluation['ema']} is not one of train.ema {train['ema']}"))
    if {"method", "time_sampler"} <= named:
        method = METHODS.get(config["method"]["name"])
        if config["time_sampler"]["name"] != "auto" and method.build.own_times:
            problems.append(
                Problem("time_sampler.name", f"method {method.name!r} uses its own discrete times; leave it at 'auto'")
            )
    if {"method", "train"} <= valid:
        entry = METHODS.get(config["method"]["name"])
        params = entry.params.model_validate({k: v for k, v in config["method"].items() if k != "name"})
        problems += [Problem(key, message) for key, message in entry.build.train_problems(params, train)]
    if {"model", "method", "train"} <= valid:
        problems += attention_checks(config)
    if not ({"eval"} <= valid and "dataset" in named):
        return problems
    dataset = DATASETS.get(config["dataset"]["name"])
    conditional = bool(config["dataset"].get("conditional"))
    for i, name in enumerate(evaluation["metrics"]):
        if name not in METRICS:
            problems.append(Problem(f"eval.metrics.{i}", str(UnknownName("metric", name, METRICS.names()))))
        elif missing := METRICS.get(name).requires - dataset.provides:
            problems.append(
                Problem(
                    f"eval.metrics.{i}",
                    f"{name} needs a dataset with {', '.join(sorted(missing))}; {dataset.name!r} has none",
                )
            )
        elif "classes" in METRICS.get(name).requires and not conditional:
            problems.append(
                Problem(f"eval.metrics.{i}", f"{name} measures class-conditional samples: set dataset.conditional")
            )
    problems += metric_option_checks(evaluation)
    if {"method", "dataset"} <= valid:
        problems += guidance_checks(config, conditional)
    return problems


def attention_checks(config: dict) -> list[Problem]:
    """model.attention `jvp_kernel` runs where there is a CUDA GPU and its package, serves forward-mode JVP passes
    only, and passes no gradient through the tangent (docs/methods.md, "JVP back-ends")."""
    if config["model"].get("attention") != "jvp_kernel":
        return []
    method = METHODS.get(config["method"]["name"])
    reasons = [jvp_kernel_problem()]
    if config["train"]["device"] == "cpu":
        reasons.append("needs a CUDA GPU, and train.device is cpu")
    if config["train"]["jvp"]["mode"] == "finite_difference":
        reasons.append("serves forward-mode passes, and train.jvp.mode finite_difference has none: use sdpa")
    params = method.build.Params.model_validate({k: v for k, v in config["method"].items() if k != "name"})
    if method.build.backpropagates_jvp(params):
        reasons.append(f"passes no gradient through the tangent, which method {method.name!r} back-propagates")
    return [Problem("model.attention", f"jvp_kernel {reason}") for reason in reasons if reason]


def metric_option_checks(evaluation: dict) -> list[Problem]:
    """eval.metric_options names metrics that declare options, and gives each valid ones; valid ones are filled in
    with their defaults (and a listed metric's options with all of its defaults), so the config records them."""
    problems, resolved = [], {}
    for name, given in evaluation["metric_options"].items():
        path = f"eval.metric_options.{name}"
        if name not in METRICS:
            problems.append(Problem(path, str(UnknownName("metric", name, METRICS.names()))))
        elif (model := METRICS.get(name).build.options_model) is None:
            problems.append(Problem(path, f"metric {name!r} has no options of its own"))
        else:
            try:
                resolved[name] = model.model_validate(given).model_dump()
            except ValidationError as e:
                problems += pydantic_problems(e, path, model, f"metric {name!r}")
    for name in evaluation["metrics"]:
        if name in METRICS and (model := METRICS.get(name).build.options_model) is not None and name not in resolved:
            resolved[name] = model().model_dump()
    if not problems:
        evaluation["metric_options"] = resolved
    return problems


def guidance_checks(config: dict, conditional: bool) -> list[Problem]:
    """Guidance options need conditional data, ranges must be ordered, and every guided NFE must be reachable."""
    method, evaluation, problems = config["method"], config["eval"], []
    ranges = {f"method.{k}": method.get(k) for k in ("online_cfg", "cfg_interval")}
    ranges["eval.guidance_interval"] = evaluation["guidance_interval"]
    for key, value in ranges.items():
        if value is not None and value[0] > value[1]:
            problems.append(Problem(key, f"[{value[0]:g}, {value[1]:g}] is not an interval (low above high)"))
    guided_training = {
        "method.online_cfg": method.get("online_cfg") is not None,
        "method.cfg_omega": method.get("cfg_omega", 1.0) != 1.0,
        "method.cfg_kappa": method.get("cfg_kappa", 0.0) != 0.0,
        "method.teacher_guidance": method.get("teacher_guidance", 1.0) != 1.0,
        "eval.guidance": evaluation["guidance"] != [1.0],
    }
    if not conditional:
        return problems + [
            Problem(key, "guidance needs class-conditional data: set dataset.conditional")
            for key, used in guided_training.items()
            if used
        ]
    if problems:
        return problems
    cfg_range = method.get("online_cfg")
    if cfg_range is not None:
        outside = [w for w in evaluation["guidance"] if not cfg_range[0] <= w <= cfg_range[1]]
        if outside:
            problems.append(
                Problem(
                    "eval.guidance",
                    f"{', '.join(f'{w:g}' for w in outside)} outside method.online_cfg "
                    f"[{cfg_range[0]:g}, {cfg_range[1]:g}]: a student with embedded guidance only knows its range",
                )
            )
        if evaluation["guidance_interval"] is not None and not method.get("online_interval", False):
            problems.append(
                Problem(
                    "eval.guidance_interval",
                    "a student with embedded guidance samples at one ω everywhere: an interval needs "
                    "method.online_interval (iMF)",
                )
            )
        if method["name"] == "stei" and method.get("target") != "teacher":
            problems.append(Problem("method.online_cfg", "stei with online CFG needs method.target: teacher"))
        if method["name"] == "stei" and not cfg_range[0] <= 1.0 <= cfg_range[1]:
            problems.append(
                Problem("method.online_cfg", "stei's flow-matching term is unguided (ω = 1): the range must contain 1")
            )
        return problems
    return problems + unreachable_nfe(config)


def unreachable_nfe(config: dict) -> list[Problem]:
    """eval.nfe values that the method's sampler cannot reach at some eval.guidance scale with two-pass CFG (each
    guided step costs two evaluations, e.g. odd NFE without a guidance interval)."""
    method_entry, evaluation = METHODS.get(config["method"]["name"]), config["eval"]
    params = method_entry.params.model_validate({k: v for k, v in config["method"].items() if k != "name"})
    interpolant = LinearInterpolant(torch.ones(2))
    method = method_entry.build(params, Setting(interpolant, None, 1.0, num_classes=2))
    problems = []
    for omega in evaluation["guidance"]:
        interval = evaluation["guidance_interval"]
        bad = [n for n in evaluation["nfe"] if sampler_calls(method, n, omega, interval, 2) is None]
        if bad:
            problems.append(
                Problem(
                    "eval.nfe",
                    f"{', '.join(map(str, bad))} not reachable with two-pass guidance at ω = {omega:g} "
                    "(a guided step costs 2 evaluations)",
                )
            )
    return problems


EXECUTION_ONLY = ("log_every", "checkpoint_every", "keep_checkpoints", "device", "workers", "threads", "compile",
                  "memory_format")  # fmt: skip
"""train.* keys that say how a trial runs, not what it trains."""
INERT = {
    ("dataset", "conditional"): False,
    ("method", "online_cfg"): None,
    ("method", "cfg_omega"): 1.0,
    ("method", "cfg_kappa"): 0.0,
    ("method", "cfg_interval"): None,
    ("method", "online_interval"): False,
    ("method", "teacher_guidance"): 1.0,
    ("method", "autoguide"): None,
    ("method", "mid_training"): None,
    ("method", "target"): "velocity",  # DMF's; the other methods' targets have other names
    ("method", "autoguide", "model"): None,
    ("train", "precision"): "auto",
    ("train", "jvp"): {"mode": "exact", "precision": "auto"},  # eps: unused in exact mode
    ("model", "attention"): "sdpa",
    ("model", "qk_norm"): False,
    ("model", "time_precision"): "fp32",
    ("model", "decoupled_blocks"): None,
    ("eval", "precision"): "fp32",
    ("eval", "fid_statistics"): None,
    ("eval", "metric_options"): {},
}
"""Options added after trial ids were first issued, at the values that train exactly as before they existed:
left out of identities and fingerprints, so that every earlier trial keeps its id and its results."""


def without_inert(config: dict) -> dict:
    """`config` without the INERT options at their inert values, without train.label_dropout when the data
    is not conditional and without train.jvp.eps in exact mode (they are then unused)."""
    out = copy.deepcopy(config)
    jvp = out.get("train", {}).get("jvp")
    if isinstance(jvp, dict) and jvp.get("mode") == "exact":
        jvp.pop("eps", None)
    for path, inert in INERT.items():
        *parents, leaf = path
        node = out
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == inert:
            del node[leaf]
    if not out.get("dataset", {}).get("conditional") and "train" in out:
        out["train"].pop("label_dropout", None)
    return out


def training_identity(config: dict) -> dict:
    """What a trial's training depends on: its resolved config without the evaluation section and the
    execution settings, so that changing how a trial is evaluated (or logged, checkpointed, placed) never
    trains it again."""
    identity = {section: value for section, value in without_inert(config).items() if section != "eval"}
    if "train" in identity:
        identity["train"] = {k: v for k, v in identity["train"].items() if k not in EXECUTION_ONLY}
    return identity


def trial_id(config: dict) -> str:
    """Stable identity of a trial: a hash of its training identity (same training → same id, any machine)."""
    return digest(training_identity(config))


def digest(data: dict) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def eval_ema(config: dict) -> float:
    """The decay of the EMA copy that samples at evaluation: eval.ema, else the first of train.ema."""
    ema = config["eval"]["ema"]
    return ema if ema is not None else config["train"]["ema"][0]


FILE_OPTIONS = ("fid_statistics",)
"""eval options that name a file: a metric's fingerprint holds its SHA-256."""


def metric_fingerprint(metric: str, config: dict) -> str:
    """What makes two values of an eval metric comparable: the metric, the data it is measured against (training
    augmentation aside), the sample count, the EMA copy that samples, and for FID the reference size and the
    feature extractor. Values with different fingerprints are never plotted as one series."""
    spec, evaluation = METRICS.get(metric).build, config["eval"]
    data = {k: v for k, v in without_inert(config)["dataset"].items() if k != "hflip"}
    basis = {"metric": metric, "dataset": data, "num_samples": evaluation["num_samples"], "ema": eval_ema(config)}
    for option in spec.options:
        value = evaluation.get(option)
        if option in FILE_OPTIONS:  # a file counts by its content; unset, it leaves earlier fingerprints alone
            if value is None:
                continue
            value = fid.file_sha256(value)
        basis[option] = value
    if evaluation.get("precision", "fp32") != "fp32":  # samples drawn in half precision are another series
        basis["precision"] = evaluation["precision"]
    if config["dataset"].get("conditional"):  # which classes the samples were asked for, and how guided
        basis["labels"] = f"class frequencies, seed train.seed + {LABEL_SEED}"
        if evaluation["guidance_interval"] is not None:
            basis["guidance_interval"] = evaluation["guidance_interval"]
    if spec.extractor is not None:
        basis["extractor"] = spec.extractor
    if spec.options_model is not None:
        basis["metric_options"] = spec.options_of(evaluation.get("metric_options", {})).model_dump()
    return f"{metric}-{digest(basis)[:8]}"


def metric_description(metric: str, config: dict) -> str:
    """What a metric's fingerprint stands for, in words: "FID of 10,000 samples vs 50,000 training images of
    cifar10 (EMA 0.9999)"."""
    spec, evaluation, dataset = METRICS.get(metric).build, config["eval"], config["dataset"]["name"]
    given = [o for o in spec.options if not (o in FILE_OPTIONS and evaluation.get(o) is None)]
    options = "".join(f", {option} {evaluation[option]}" for option in given)
    if spec.options_model is not None:
        own = spec.options_of(evaluation.get("metric_options", {})).model_dump()
        options += "".join(f", {key} {value}" for key, value in own.items())
    return f"{spec.title} of {evaluation['num_samples']:,} samples of {dataset} (EMA {eval_ema(config)}{options})"


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{'method': {'name': 'lsd'}} → {'method.name': 'lsd'}; the MLflow params of a trial."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{path}.")
        else:
            flat[path] = value
    return flat
