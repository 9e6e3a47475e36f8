"""`orch eval`: the papers' protocol after training. Each selected trial's stored weights (the best checkpoint per
step count, the last checkpoint or a given step) are sampled again at a chosen sample count, NFE, guidance scale
and number of seed ranges, scored by the registered metrics and logged into the trial's MLflow run as
`final/<metric>/nfe_<N>[/cfg_<ω>]` (the mean over seed ranges), `…/seed_<k>` and `…/spread` (half the range).

Every (metric, NFE, ω, seed range) is one unit of work, recorded atomically in <trial>/final.json with the
fingerprint of what it measured: a unit already done under the same fingerprint is never redone, so a run
again does nothing and a killed run finishes the rest."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from orch.execution.build import build_trainer
from orch.execution.trial import Trial
from orch.methods.evaluation.generation import EvalConfig, eval_labels, generate
from orch.methods.evaluation.metric import metric as metric_spec
from orch.methods.runtime.storage import exclusive
from orch.methods.training.trainer import resolve_device
from orch.problems import Problem
from orch.tracking.schema import (
    DIRECTION,
    EVAL,
    FINAL,
    FINAL_TAG,
    EvalKey,
    eval_key,
    eval_suffix,
    seed_key,
    spread_key,
)
from orch.tracking.store import TRACKING_ERRORS, log_batch, not_yet_logged
from orch.trial.config import digest, eval_ema, flatten, metric_description, metric_fingerprint, resolve_trial_config
from orch.trial.state import (
    FINAL_RESULTS,
    TrialState,
    load_checkpoint_at,
    load_latest_checkpoint,
    read_json,
    write_json,
)
from orch.trial.status import COMPLETED, STOPPED
from orch.trial.typed import TrialConfig

SEED_RANGE = 10_000_019
"""Offset of train.seed between seed ranges: range 0 draws the noise and labels of the trial's own evaluations
(so it reproduces them at the same sample count), range k those of train.seed + k·SEED_RANGE."""
EVALUABLE = (COMPLETED, STOPPED)
"""Trials whose weights are final: completed, or stopped early by a search scheduler."""


@dataclass(frozen=True)
class Request:
    """What `orch eval` measures; None keeps each trial's own eval option."""

    checkpoint: str = "best"
    """best (per NFE and guidance scale, as selected during training) | last | a training step."""
    nfe: list[int] | None = None
    num: int | None = None
    metrics: list[str] | None = None
    guidance: list[float] | None = None
    seeds: int = 1
    device: str | None = None

    def eval_section(self, trial: Trial) -> dict:
        """The trial's eval section with this request's options in place."""
        section = dict(trial.config["eval"])
        updates = {"nfe": self.nfe, "num_samples": self.num, "metrics": self.metrics, "guidance": self.guidance}
        return section | {k: v for k, v in updates.items() if v is not None}


@dataclass(frozen=True)
class Unit:
    metric: str
    nfe: int
    omega: float
    seed_range: int

    @property
    def suffix(self) -> str:
        return eval_suffix(self.nfe, self.omega)

    @property
    def key(self) -> str:
        return seed_key(self.metric, self.nfe, self.omega, self.seed_range)

    def seed(self, config: dict) -> int:
        """The seed its samples are drawn with (see SEED_RANGE)."""
        return config["train"]["seed"] + self.seed_range * SEED_RANGE


def select_trials(study_dir: Path, ids: list[str] | None, where: dict[str, object]) -> tuple[list[Trial], list[str]]:
    """The study's trials named by `ids` (all when None) whose resolved config has every `where` value (dotted
    keys, e.g. method.name = lsd), and a note for each one left out because its weights are not final."""
    trials_dir = study_dir / "trials"
    names = ids if ids else sorted(p.name for p in trials_dir.iterdir() if (p / "trial.json").is_file())
    chosen, notes = [], []
    for name in names:
        trial = Trial.load(trials_dir / name)
        flat = flatten(trial.config)
        if any(flat.get(key) != value for key, value in where.items()):
            continue
        status = TrialState.load(trials_dir / name).status
        if status not in EVALUABLE:
            notes.append(f"trial {name} ({trial.label}) is {status}: only completed or stopped trials are evaluated")
            continue
        chosen.append(trial)
    return chosen, notes


def trial_id_problem(trial_id: str, trials_dir: Path) -> Problem | None:
    """A trial id names a trial folder of the study, never a path out of it (`../../other/trials/…`)."""
    if Path(trial_id).name != trial_id or trial_id in (".", ".."):
        return Problem(f"--trials {trial_id}", f"{trial_id!r} is not a trial id (a folder in {trials_dir})")
    if not (trials_dir / trial_id / "trial.json").is_file():
        return Problem(f"--trials {trial_id}", f"no trial {trial_id!r} in {trials_dir}")
    return None


def request_problems(study_dir: Path, request: Request, ids: list[str] | None, where: dict) -> list[Problem]:
    """Problems with a request, found before anything is evaluated: unknown trials or options, and eval options
    that the study's own validation refuses for a trial (an unknown metric, one the data cannot give, an
    unreachable NFE)."""
    trials_dir = study_dir / "trials"
    problems = [problem for i in ids or [] if (problem := trial_id_problem(i, trials_dir))]
    if problems:
        return problems
    trials, _ = select_trials(study_dir, ids, {})
    known = set().union(*(flatten(t.config) for t in trials)) if trials else set()
    problems += [Problem(f"--where {k}", "no trial has this option") for k in where if k not in known]
    if request.checkpoint not in ("best", "last") and not request.checkpoint.isdigit():
        problems.append(Problem("--checkpoint", f"{request.checkpoint!r} is not best, last or a step number"))
    if request.seeds < 1:
        problems.append(Problem("--seeds", "at least 1 seed range"))
    seen = set()
    for trial in trials:
        _, found = resolve_trial_config(trial.config | {"eval": request.eval_section(trial)})
        for p in found:
            if (p.path, p.message) not in seen:
                seen.add((p.path, p.message))
                problems.append(Problem(p.path, f"{p.message} (trial {trial.id})"))
    return problems or weights_problems(trials, request)


def weights_problems(trials: list[Trial], request: Request) -> list[Problem]:
    """The first step count (and scale) of each trial that the requested checkpoint has no weights for: the
    whole request is refused before anything is computed."""
    lacking: dict[str, list[str]] = {}  # why → the trials it holds for
    for trial in trials:
        section, weights = request.eval_section(trial), Weights(trial, request.checkpoint, eval_ema(trial.config))
        units = [Unit("", n, w, 0) for n in section["nfe"] for w in section["guidance"]]
        if why := next(filter(None, map(weights.missing, units)), None):
            lacking.setdefault(why, []).append(trial.id)
    return [Problem("--checkpoint", f"{why} (trial {', '.join(ids)})") for why, ids in lacking.items()]


def units_of(evaluation: EvalConfig, seeds: int) -> list[Unit]:
    return [
        Unit(m, n, w, k)
        for w in evaluation.guidance
        for n in evaluation.nfe
        for k in range(seeds)
        for m in evaluation.metrics
    ]


class Weights:
    """The EMA weights a unit is sampled from: the best checkpoint of its NFE and scale (selected on the trial's
    first eval metric during training), or the last or a given step's checkpoint, of the EMA copy `ema`."""

    def __init__(self, trial: Trial, checkpoint: str, ema: float):
        self.dir, self.checkpoint, self.ema, self.trial_id = Path(trial.dir), checkpoint, ema, trial.id
        self.selection = trial.config["eval"]["metrics"][0]
        self.index = read_json(self.dir / "best" / "best.json")
        self.loaded: dict[str, tuple[dict, int]] = {}

    def source(self, unit: Unit) -> str:
        """Which file holds the unit's weights (the cache key and part of its fingerprint)."""
        if self.checkpoint == "best":
            return f"best/{EvalKey(EVAL, self.selection, unit.nfe, unit.omega).file_stem}.pt"
        return self.checkpoint

    def missing(self, unit: Unit) -> str | None:
        """Why the unit has no weights, or None."""
        if self.checkpoint == "best":
            key, index = eval_key(self.selection, unit.nfe, unit.omega), self.dir / "best" / "best.json"
            if index.is_file() and not self.index:
                return f"{index} is unreadable: use --checkpoint last (or a kept step)"
            if key not in self.index or not (self.dir / self.source(unit)).is_file():
                return f"no best checkpoint for {key} (training did not evaluate it): use --checkpoint last"
        return None

    def load(self, unit: Unit) -> tuple[dict, int]:
        """(the network's state dict, the training step it is from)."""
        source = self.source(unit)
        if source not in self.loaded:
            if self.checkpoint == "best":
                saved = torch.load(self.dir / source, map_location="cpu", weights_only=True)
                self.loaded[source] = saved["net"], int(saved["step"])
            else:
                step = None if self.checkpoint == "last" else int(self.checkpoint)
                saved = load_latest_checkpoint(self.dir) if step is None else load_checkpoint_at(self.dir, step)
                if saved is None:
                    raise FileNotFoundError(f"trial {self.trial_id}: no readable checkpoint {self.checkpoint}")
                self.loaded[source] = saved["trainer"]["ema"][str(self.ema)], saved["trainer"]["step"]
        return self.loaded[source]


def unit_fingerprint(unit: Unit, config: dict, source: str, step: int) -> str:
    """What a unit's value depends on: the metric's fingerprint (data, sample count, EMA copy, reference,
    extractor), the NFE and scale, the weights (file and training step) and the seed range."""
    basis = {"metric": metric_fingerprint(unit.metric, config), "suffix": unit.suffix, "weights": source}
    return digest(basis | {"step": step, "seed_range": unit.seed_range})


def protocol_tags(config: dict, request: Request, series: dict[str, list[str]], tags: dict[str, str]) -> dict[str, str]:
    """The run's tag orch.final.<metric> updated with this request's series (metric → suffixes logged now):
    JSON {"series": {suffix: protocol fingerprint}, "protocols": {fingerprint: {measured_as, num_samples,
    checkpoint, seeds, dataset}}}, so that every final value says how it was measured even when one trial's NFEs
    were evaluated by different requests; and orch.direction.<metric>, which way is better (a metric measured
    only after training has no other record)."""
    where = "best checkpoint per NFE" if request.checkpoint == "best" else f"checkpoint {request.checkpoint}"
    updated = {}
    for m, suffixes in series.items():
        record = json.loads(tags.get(f"{FINAL_TAG}{m}", "{}"))
        basis = {"metric": metric_fingerprint(m, config), "checkpoint": request.checkpoint, "seeds": request.seeds}
        fingerprint = digest(basis)[:8]
        record.setdefault("series", {}).update(dict.fromkeys(suffixes, fingerprint))
        record.setdefault("protocols", {})[fingerprint] = {
            "measured_as": f"{metric_description(m, config)}, {where}, {request.seeds} seed range(s)",
            "num_samples": config["eval"]["num_samples"],
            "checkpoint": request.checkpoint,
            "seeds": request.seeds,
            "dataset": config["dataset"]["name"],
        }
        used = set(record["series"].values())
        record["protocols"] = {fp: p for fp, p in record["protocols"].items() if fp in used}
        updated[f"{FINAL_TAG}{m}"] = json.dumps(record, sort_keys=True)
        updated[f"{DIRECTION}{m}"] = metric_spec(m).direction
    return updated


def evaluate_trial(trial: Trial, request: Request, say: Callable[[str], None]) -> tuple[int, int]:
    """Evaluate one trial's pending units (see the module docstring); returns (units done now, units skipped for
    want of weights). Holds <trial>/final.lock, so two `orch eval` processes never work on one trial at once."""
    trial_dir = Path(trial.dir)
    with exclusive(trial_dir / "final.lock"):
        return evaluate_locked(trial, request, say)


def evaluate_dir(
    trial_dir: str, request: Request, say: Callable[[str], None] | None = None
) -> tuple[int, int, list[str]]:
    """evaluate_trial of a trial directory, as a backend task runs it: (units done now, units not done: lacking
    weights, or all of a trial whose evaluation failed, the lines it said). The lines are also returned because
    a Ray worker's or a Slurm job's output is not the user's terminal; a failure is one line, and the other
    trials go on."""
    lines: list[str] = []

    def record(line: str) -> None:
        lines.append(line)
        if say is not None:
            say(line)

    trial = Trial.load(trial_dir)
    try:
        computed, lacking = evaluate_trial(trial, request, record)
    except Exception as e:  # e.g. out of memory, MLflow refusing the results (they stay in final.json)
        record(
            f"trial {trial.id}: the evaluation failed ({type(e).__name__}: {str(e).strip()[:300]}); done ones are kept"
        )
        return 0, 1, lines
    return computed, lacking, lines


def evaluate_locked(trial: Trial, request: Request, say: Callable[[str], None]) -> tuple[int, int]:
    trial_dir = Path(trial.dir)
    parsed = TrialConfig.parse(trial.config | {"eval": request.eval_section(trial)})
    config, evaluation = parsed.raw, parsed.eval
    weights = Weights(trial, request.checkpoint, eval_ema(config))
    units, groups = units_of(evaluation, request.seeds), {}
    for unit in units:  # the units of one NFE, scale and seed range share their samples
        if why := weights.missing(unit):
            say(f"trial {trial.id}: {unit.key}: {why}")
        else:
            groups.setdefault((unit.nfe, unit.omega, unit.seed_range), []).append(unit)
    results = read_json(trial_dir / FINAL_RESULTS)
    done: dict[str, dict] = results.get("units", {})
    client, trainer, computed = MlflowClient(trial.tracking_uri), None, 0
    for group in groups.values():
        state, step = weights.load(group[0])  # one weights file per NFE and scale
        fingerprints = {u: unit_fingerprint(u, config, weights.source(u), step) for u in group}
        todo = [(u, f) for u, f in fingerprints.items() if done.get(u.key, {}).get("fingerprint") != f]
        if todo:
            if trainer is None:  # sampling needs no teacher
                trainer = build_trainer(parsed, resolve_device(request.device or parsed.train.device))
            trainer.ema_net(weights.ema).load_state_dict(state)
            for unit, value, seconds in score(trainer, evaluation, config, todo):
                done[unit.key] = {"value": value, "fingerprint": fingerprints[unit], "step": step, "logged": False}
                write_json(trial_dir / FINAL_RESULTS, results | {"units": done})
                computed += 1
                say(
                    f"trial {trial.id} ({trial.label}): {unit.metric} {unit.suffix} seed range {unit.seed_range}: "
                    f"{value:.5g} ({evaluation.num_samples:,} samples, step {step}, {seconds:.0f} s)"
                )
        rows, tags = log_results(client, trial, units, done, request, config)
        results |= {"logged": results.get("logged", []) + rows, "tags": results.get("tags", {}) | tags}
        write_json(trial_dir / FINAL_RESULTS, results | {"units": done})
    return computed, len(units) - sum(map(len, groups.values()))


def score(trainer, evaluation: EvalConfig, config: dict, todo: list[tuple[Unit, str]]):
    """Sample once for units of one NFE, scale and seed range with the trainer's loaded EMA copy, then yield
    (unit, value, seconds since sampling began) for each unit's metric."""
    first, started = todo[0][0], time.perf_counter()
    seed = first.seed(config)
    labels = eval_labels(trainer.dataset, evaluation.num_samples, seed)
    net, data, device = trainer.ema_net(evaluation.ema), trainer.dataset, trainer.device
    args = (trainer.method, net, trainer.interpolant, data, evaluation, first.nfe, seed, device, first.omega, labels)
    samples = generate(*args)
    for unit, _ in todo:
        value = float(metric_spec(unit.metric)(samples, data, evaluation, device, labels))
        yield unit, value, time.perf_counter() - started


def log_results(
    client: MlflowClient, trial: Trial, units: list[Unit], done: dict[str, dict], request: Request, config: dict
) -> tuple[list, dict[str, str]]:
    """Log the units not yet in MLflow, and the mean and spread over seed ranges of each complete (metric,
    suffix) unless the run has them: a unit is marked logged only after MLflow took it. Returns the rows (key,
    value, step) and tags MLflow took, which final.json keeps so that a rebuilt store gets them back."""
    rows = [
        (u.key, done[u.key]["value"], done[u.key]["step"])
        for u in units
        if not done.get(u.key, {"logged": True})["logged"]
    ]
    by_series: dict[tuple[str, int, float], list[dict]] = {}
    for u in units:
        by_series.setdefault((u.metric, u.nfe, u.omega), []).append(done.get(u.key))
    complete: dict[str, list[str]] = {}
    for (metric, nfe, omega), results in by_series.items():
        if any(r is None for r in results):
            continue
        values, step = [r["value"] for r in results], max(r["step"] for r in results)
        series, spread = eval_key(metric, nfe, omega, FINAL), spread_key(metric, nfe, omega)
        rows += [(series, sum(values) / len(values), step), (spread, (max(values) - min(values)) / 2, step)]
        complete.setdefault(metric, []).append(eval_suffix(nfe, omega))
    try:
        rows = not_yet_logged(client, trial.run_id, rows)
        before = client.get_run(trial.run_id).data.tags
        tags = {k: v for k, v in protocol_tags(config, request, complete, before).items() if before.get(k) != v}
        if rows or tags:
            log_batch(client, trial.run_id, metrics=rows, tags=tags)
    except TRACKING_ERRORS as e:
        raise RuntimeError(f"MLflow did not take the final metrics ({type(e).__name__}: {e})") from e
    for u in units:
        if u.key in done:
            done[u.key]["logged"] = True
    return [list(row) for row in rows], tags
