"""A trial as its workers see it: the Trial record (<trial dir>/trial.json) and opening it on the driver, with
its directory, state and MLflow run created on first use and the same ever after."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from mlflow.tracking import MlflowClient

from orch.execution.build import prior_stage
from orch.tracking.schema import FACTORS, GENERATION, REASON, STATUS, STOPPED_STEP, TRIAL_ID, is_eval_key
from orch.tracking.store import ensure_trial_run, find_runs, log_batch, not_yet_logged, rebased_uri, replay_run
from orch.trial.spec import TrialSpec
from orch.trial.state import TrialState, newest_checkpoint_step, read_metrics, write_json
from orch.trial.status import FINISHED_STATES, PENDING, UNREADABLE
from orch.trial.typed import TrialConfig

log = logging.getLogger(__name__)


class EarlyStopped(Exception):
    """Raised from a progress callback when a search scheduler stops the trial: recorded as `stopped`."""


Progress = Callable[[int, dict[str, float]], None]
"""Called with (step, metrics) at every log tick and evaluation."""


@dataclass(frozen=True)
class Trial:
    """Everything a worker needs to run one trial; written to <trial dir>/trial.json by the driver."""

    id: str
    study: str
    label: str
    config: dict
    factors: dict
    dir: str
    tracking_uri: str
    run_id: str
    generation: str = ""
    """The version of the study file that last planned this trial (`orch status` shows the current one's)."""
    teacher: str | None = None
    """The teacher it distils: a planned teacher's file, or the file or trial directory the study names."""
    teacher_name: str | None = None
    """How its run names that teacher (tag orch.teacher): the planned teacher's id, or the named path."""
    guide: str | None = None
    """The weak teacher that autoguides its teacher: a planned one's file, or the file or directory named."""
    stage: str | None = None
    """The prior stage it starts from: a planned stage's file, or the file or directory named."""

    @cached_property
    def parsed(self) -> TrialConfig:
        """Its config, typed: parsed once in each process that runs the trial."""
        return TrialConfig.parse(self.config)

    def __getstate__(self) -> dict:  # sent to a worker without its parsed config: the worker parses its own
        return {k: v for k, v in self.__dict__.items() if k != "parsed"}

    def save(self) -> None:
        write_json(Path(self.dir) / "trial.json", asdict(self))

    @classmethod
    def load(cls, trial_dir: str | Path) -> Trial:
        """The trial recorded in <trial_dir>/trial.json, where it is now: the trial directory of a copied or moved
        study writes to itself and to the copy's own default store, never to the original's."""
        trial_dir = Path(trial_dir).resolve()
        trial = cls(**json.loads((trial_dir / "trial.json").read_text()))
        if Path(trial.dir) == trial_dir:
            return trial
        uri = rebased_uri(trial.tracking_uri, Path(trial.dir).parents[1], trial_dir.parents[1])
        return dataclasses.replace(trial, dir=str(trial_dir), tracking_uri=uri)


def open_trial(
    client: MlflowClient,
    experiment_id: str,
    parent_id: str,
    study: str,
    study_dir: Path,
    spec: TrialSpec,
    generation: str,
    say: Callable[[str], None] = log.warning,
    teachers: dict[str, Path] | None = None,
) -> tuple[Trial, TrialState]:
    """A trial's directory, state and MLflow child run: created on first use, the same ones ever after (the run
    recorded in state.json, else the one tagged with the trial id), with trial.json written for the workers and
    the run tagged with the trial's factor levels and the study version that planned it.

    The trial directory is the source of truth: an unreadable state.json is re-derived from the MLflow run and
    the checkpoints, and a run that is missing from the store (a lost or replaced store) is rebuilt from the
    directory's metrics log and state; both are said."""
    trial_dir = study_dir / "trials" / spec.id
    trial_dir.mkdir(parents=True, exist_ok=True)
    state = TrialState.load(trial_dir)
    if state.status == UNREADABLE:
        state, how = rederive_state(client, experiment_id, spec.id, trial_dir, spec.config["train"]["steps"])
        say(f"trial {spec.id}: {state.reason or 'state.json was unreadable'}; {how}")
        state.reason = None
        state.save(trial_dir)
    run_id = ensure_trial_run(client, experiment_id, parent_id, spec.id, spec.label, spec.config, state.run_id)
    if state.run_id != run_id:
        if state.run_id is not None:
            final = replay_run(client, run_id, trial_dir, state)
            state.unlogged = False
            extra = f", with {final} final metric row(s) of `orch eval`" if final else ""
            say(f"trial {spec.id}: its MLflow run {state.run_id} is not in the store; rebuilt from {trial_dir}{extra}")
        state.run_id = run_id
        state.save(trial_dir)
    elif state.unlogged:
        missing = log_unlogged(client, run_id, trial_dir, state)
        say(f"trial {spec.id}: {missing} metric row(s) of its metrics log had not reached MLflow; logged now")
    log_batch(client, run_id, tags={FACTORS: json.dumps(spec.levels), GENERATION: generation})
    method = spec.config["method"]
    named = (method.get("teacher") or {}).get("path")
    planned = trained(teachers, spec.teacher)
    teacher, teacher_name = (planned, spec.teacher) if planned else (named, named)
    guide = trained(teachers, spec.guide) or (method.get("autoguide") or {}).get("path")
    stage = trained(teachers, spec.stage) or named_stage(method)
    trial = Trial(
        spec.id,
        study,
        spec.label,
        spec.config,
        spec.factors,
        str(trial_dir),
        client.tracking_uri,
        run_id,
        generation,
        teacher,
        teacher_name,
        guide,
        stage,
    )
    trial.save()
    return trial, state


def trained(teachers: dict[str, Path] | None, planned: str | None) -> str | None:
    """The file of a planned teacher, weak teacher or stage, once trained."""
    file = (teachers or {}).get(planned) if planned is not None else None
    return str(file) if file else None


def named_stage(method: dict) -> str | None:
    """The trained prior stage the trial's method section names, if any."""
    stage = prior_stage(method)
    return stage[1]["path"] if stage is not None else None


def log_unlogged(client: MlflowClient, run_id: str, trial_dir: Path, state: TrialState) -> int:
    """Log the rows of the trial's metrics log that its MLflow run lacks (a write that failed, e.g. on a full
    disk), once each; returns how many."""
    rows = read_metrics(trial_dir)
    missing = not_yet_logged(client, run_id, rows)
    log_batch(client, run_id, metrics=missing)
    state.unlogged, state.logged_step = False, max([state.logged_step, *(step for _, _, step in rows)])
    state.save(trial_dir)
    return len(missing)


def rederive_state(
    client: MlflowClient, experiment_id: str, trial_id: str, trial_dir: Path, steps: int
) -> tuple[TrialState, str]:
    """A trial's state rebuilt from what else records it: its MLflow run's outcome when the run finished, else
    its newest checkpoint (a resume continues from there). Returns the state and how it was obtained."""
    broken = TrialState.load(trial_dir).reason
    runs = find_runs(client, experiment_id, f"tags.`{TRIAL_ID}` = '{trial_id}'")
    logged = max((s for _, _, s in read_metrics(trial_dir)), default=-1)
    run = runs[0] if runs else None
    outcome = run.data.tags.get(STATUS) if run else None
    if run is not None and outcome in FINISHED_STATES:
        step = int(run.data.tags.get(STOPPED_STEP, steps))
        result = {k: v for k, v in run.data.metrics.items() if is_eval_key(k)}
        state = TrialState(outcome, step, run.info.run_id, run.data.tags.get(REASON), result, logged_step=logged)
        return state, f"re-derived from its MLflow run: {outcome} at step {step}, not run again"
    step = newest_checkpoint_step(trial_dir)
    state = TrialState(PENDING, step, run.info.run_id if run else None, broken, logged_step=logged)
    return state, f"re-derived from its checkpoints: it continues from step {step}" if step else "it runs again"


def finish_detail(trial: Trial) -> tuple[str, str, list[str]]:
    """(status, last line of the reason, warnings) from the trial directory, the source of truth."""
    state = TrialState.load(Path(trial.dir))
    return state.status, state.reason.strip().splitlines()[-1] if state.reason else "", state.warnings
