"""The Slurm backend: each trial is a submitit job, the trials of one submission one job array.

The trial directory stays the source of truth. A job runs run_trial on its directory, which resumes from the
newest checkpoint, so a job that Slurm requeues (timeout or preemption through submitit's checkpointing, or
`scontrol requeue`) continues where its last checkpoint left it. The driver only submits and watches: it reads
progress from the trial directories and job states from `squeue`, resubmits a job that died without recording an
outcome (up to backend.max_failures times), and stops watching on Ctrl-C while the jobs keep running.
"""

from __future__ import annotations

import functools
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import submitit
from pydantic import NonNegativeInt, PositiveFloat, PositiveInt, field_validator

from orch.backends.base import JOB_FILE, Backend, BackendError, BackendParams, register_backend
from orch.backends.sbatch import Line, option_problem
from orch.problems import Problem
from orch.progress import Progress
from orch.trial.state import TrialState, read_json, write_json
from orch.trial.status import CANCELLED, FAILED, OUTCOMES, RUNNING

if TYPE_CHECKING:
    from orch.execution.trial import Trial


class SlurmParams(BackendParams):
    """submitit's parameter names; a study's trials go out as one job array per submission."""

    name: Literal["slurm"] = "slurm"
    partition: str | None = None
    """The Slurm partition (null: the cluster's default)."""
    timeout_min: PositiveInt = 240
    """Minutes a job may run; a job that reaches it is requeued and resumes from its checkpoint."""
    nodes: PositiveInt = 1
    """Nodes per job: more than 1 (or tasks_per_node above 1) makes each trial data-parallel over
    nodes × tasks_per_node tasks (docs/parallel.md), each taking train.batch_size / tasks of every batch. A
    trial's train.workers overrides the count: its job has that many tasks over these nodes (one node for 1)."""
    tasks_per_node: PositiveInt = 1
    """Tasks per node, one data-parallel worker each (one per GPU on GPU nodes)."""
    cpus_per_task: PositiveInt = 1
    """CPUs per task."""
    gpus_per_node: NonNegativeInt = 0
    """GPUs per node."""
    mem_gb: PositiveFloat | None = None
    """Memory per job (null: the partition's default)."""
    array_parallelism: PositiveInt = 64
    """At most this many of the array's jobs run at once."""
    account: Line | None = None
    """The account the jobs are charged to (sbatch --account)."""
    qos: Line | None = None
    """The quality of service (sbatch --qos)."""
    constraint: Line | None = None
    """Node features the jobs need (sbatch --constraint, e.g. "a100|h100")."""
    exclusive: bool = False
    """Whole nodes, shared with no other job (sbatch --exclusive)."""
    reservation: Line | None = None
    """A reservation to run in (sbatch --reservation)."""
    setup: list[Line] = []
    """Shell lines each job runs before its trial, in order (e.g. "module load cuda/12.4", "source
    ~/envs/orch/bin/activate"); they run as you on the cluster: `orch plan --backend slurm` shows them."""
    additional_parameters: dict[str, Line | PositiveInt | Literal[True]] = {}
    """Any other sbatch long option → its value (true for a flag), e.g. {mail-type: END, mail-user: me@lab.org}:
    written into the job script as `#SBATCH --KEY=VALUE` (the value quoted), never through a shell. Options orch
    sets itself are refused, naming the key to use instead."""

    @field_validator("additional_parameters")
    @classmethod
    def sbatch_options(cls, parameters: dict) -> dict:
        if problems := [problem for key in parameters if (problem := option_problem(key))]:
            raise ValueError("; ".join(problems))
        return parameters

    def workers(self) -> int:
        return self.nodes * self.tasks_per_node

    def workers_refused(self, workers: int) -> str | None:
        if workers > 1 and workers % self.nodes:
            return f"{workers} worker(s) do not spread equally over backend.nodes {self.nodes}"
        return None

    def job_shape(self, workers: int) -> tuple[int, int]:
        """(nodes, tasks per node) of a trial's job: one task for one worker, else `workers` over `nodes`."""
        return (1, 1) if workers == 1 else (self.nodes, workers // self.nodes)


ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
          "RESIZING", "SIGNALING", "STAGE_OUT"}  # fmt: skip
POLL_SECONDS = 2.0


class SlurmError(BackendError):
    """Slurm's commands are missing or failing."""


class SlurmTrial(submitit.helpers.Checkpointable):
    """What a job runs. On timeout or preemption submitit calls `checkpoint` (inherited: resubmit the same call)
    and requeues the job; run_trial then resumes from the directory's newest checkpoint."""

    def __call__(self, trial_dir: str) -> str:
        from orch.execution.runner import run_trial
        from orch.execution.trial import Trial

        if submitit.JobEnvironment().num_tasks == 1:
            return run_trial(Trial.load(trial_dir))  # a failed trial is a result, not an infrastructure error
        return run_task_rank(trial_dir)


def run_task_rank(trial_dir: str) -> str:
    """One task of a data-parallel job: it joins the trial's process group from the Slurm environment (through
    submitit's torch.distributed helper: rank 0's node is the rendezvous, on loopback when the job has one node;
    each task sees only its own GPU) and runs the trial as that rank."""
    from orch.execution.distributed import process_group
    from orch.execution.runner import run_trial
    from orch.execution.trial import Trial

    environment = submitit.helpers.TorchDistributedEnvironment()
    if submitit.JobEnvironment().num_nodes == 1:
        environment.master_addr = "127.0.0.1"
    environment.export(set_cuda_visible_devices=True)
    trial = Trial.load(trial_dir)
    with process_group(environment.rank, environment.world_size, "env://", trial.config["train"]["device"]):
        return run_trial(trial)


def slurm_command(*args: str) -> str:
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmError(f"cannot run {args[0]}: {e}") from None
    if done.returncode != 0:
        raise SlurmError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def queue_states() -> dict[str, str]:
    """The state of every job slurmctld knows, array tasks one by one: job id → state (e.g. "RUNNING")."""
    out = slurm_command("squeue", "--noheader", "--array", "--states=all", "--format=%i|%T")
    return dict(line.split("|", 1) for line in out.split())


def read_job(trial_dir: str | Path) -> dict | None:
    """The trial's latest Slurm submission: {"job_id", "attempt", "log"}."""
    return read_json(Path(trial_dir) / JOB_FILE) or None


def sbatch_parameters(study: str, backend: SlurmParams, workers: int) -> dict[str, Any]:
    """submitit's Slurm parameters (its SlurmExecutor's names) of the jobs of trials of `workers` data-parallel
    workers: what the job script says."""
    nodes, tasks_per_node = backend.job_shape(workers)
    optional = {
        "partition": backend.partition,
        "mem": f"{round(backend.mem_gb * 1024)}MB" if backend.mem_gb is not None else None,
        "account": backend.account,
        "qos": backend.qos,
        "constraint": backend.constraint,
        "exclusive": backend.exclusive or None,
        "setup": list(backend.setup) or None,
    }
    extra = ({"reservation": backend.reservation} if backend.reservation else {}) | backend.additional_parameters
    return {
        "job_name": f"orch-{study}",
        "time": backend.timeout_min,
        "nodes": nodes,
        "ntasks_per_node": tasks_per_node,
        "cpus_per_task": backend.cpus_per_task,
        "gpus_per_node": backend.gpus_per_node,
        "array_parallelism": backend.array_parallelism,
        **{key: value for key, value in optional.items() if value is not None},
        **({"additional_parameters": extra} if extra else {}),
    }


def job_script(study_dir: Path, study: str, backend: SlurmParams, workers: int, jobs: int) -> str:
    """The sbatch script of the job array of `jobs` trials of `workers` workers, as submitit writes it."""
    folder = study_dir / "slurm" / "%j"
    command = shlex.join([sys.executable, "-u", "-m", "submitit.core._submit", str(folder)])
    parameters = sbatch_parameters(study, backend, workers)
    # submitit's own writer of the script it submits (private: the pin in pyproject.toml keeps its signature)
    return submitit.slurm.slurm._make_sbatch_string(command=command, folder=folder, map_count=jobs, **parameters)


def make_executor(study_dir: Path, study: str, backend: SlurmParams, workers: int) -> submitit.SlurmExecutor:
    """An executor of jobs for trials of `workers` data-parallel workers."""
    executor = submitit.SlurmExecutor(folder=study_dir / "slurm" / "%j")
    executor.update_parameters(**sbatch_parameters(study, backend, workers))
    return executor


def submit_jobs(executors: Callable[[int], submitit.SlurmExecutor], backend: SlurmParams, trials: list[Trial]) -> None:
    """One job array for the trials of each worker count (`executors`: worker count → its executor); each trial
    directory records its job."""
    by_workers: dict[int, list[Trial]] = {}
    for trial in trials:
        by_workers.setdefault(backend.trial_workers(trial.config), []).append(trial)
    for workers, group in by_workers.items():
        executor = executors(workers)
        with executor.batch():
            jobs = [executor.submit(SlurmTrial(), t.dir) for t in group]
        record_jobs(group, jobs)


def record_jobs(trials: list[Trial], jobs: list) -> None:
    for trial, job in zip(trials, jobs):
        previous = read_job(trial.dir)
        attempt = previous["attempt"] + 1 if previous else 1
        write_json(Path(trial.dir) / JOB_FILE, {"job_id": job.job_id, "attempt": attempt, "log": str(job.paths.stderr)})


def run_slurm(trials: list[Trial], study_dir: Path, study: str, backend: SlurmParams, progress: Progress, say) -> None:
    """Submit the trials that have no live job (others, from an interrupted driver, are watched again) and watch
    until every trial has an outcome."""
    executors = functools.cache(functools.partial(make_executor, study_dir, study, backend))
    states = queue_states()
    live = [t for t in trials if (job := read_job(t.dir)) and states.get(job["job_id"]) in ACTIVE]
    if live:
        say(f"{len(live)} trial(s) still queued or running on Slurm from an earlier submission: watching them")
    submit_jobs(executors, backend, [t for t in trials if t not in live])
    try:
        watch(trials, executors, backend, progress, say)
    except KeyboardInterrupt:
        say("stopped watching; the Slurm jobs keep running (`orch status` shows them, `orch cancel` stops them)")
        raise


def watch(trials: list[Trial], executors, backend: SlurmParams, progress: Progress, say) -> None:
    from orch.execution.trial import finish_detail

    waiting = {t.id: t for t in trials}
    steps: dict[str, int] = {}
    while waiting:
        states = queue_states()
        for trial in list(waiting.values()):
            state, job = TrialState.load(Path(trial.dir)), read_job(trial.dir)
            if state.status == RUNNING and steps.get(trial.id) != state.step:
                if trial.id not in steps:
                    progress.started(trial.id, state.step)
                progress.update(trial.id, state.step, state.result)
                steps[trial.id] = state.step
            slurm_state = states.get(job["job_id"])
            if slurm_state in ACTIVE:
                continue
            if slurm_state == "CANCELLED" and state.status not in OUTCOMES:
                state.status, state.reason = CANCELLED, f"Slurm job {job['job_id']} was cancelled"
                state.save(Path(trial.dir))
            if state.status in (*OUTCOMES, CANCELLED):
                progress.finished(trial.id, *finish_detail(trial))
                del waiting[trial.id]
            elif job["attempt"] <= backend.max_failures:
                say(f"{trial.label}: Slurm job {job['job_id']} ended ({slurm_state or 'gone'}) without an outcome; "
                    f"resubmitting (attempt {job['attempt'] + 1})")  # fmt: skip
                submit_jobs(executors, backend, [trial])
            else:
                state.status = FAILED
                state.reason = (
                    f"Slurm job {job['job_id']} ended ({slurm_state or 'gone'}) without recording an outcome, "
                    f"{job['attempt']} attempt(s); its log: {job['log']}"
                )
                state.save(Path(trial.dir))
                progress.finished(trial.id, FAILED, state.reason)
                del waiting[trial.id]
        if waiting:
            time.sleep(POLL_SECONDS)


def cancel_jobs(trial_dirs: list[Path], wait_seconds: float = 120.0) -> list[str]:
    """scancel the live jobs of these trials and wait until Slurm has ended them (so that none writes to its
    trial directory afterwards); returns their ids."""
    states = queue_states()
    ids = [job["job_id"] for d in trial_dirs if (job := read_job(d)) and states.get(job["job_id"]) in ACTIVE]
    if ids:
        slurm_command("scancel", *ids)
    deadline = time.time() + wait_seconds
    while ids and any(queue_states().get(i) in ACTIVE for i in ids) and time.time() < deadline:
        time.sleep(POLL_SECONDS / 2)
    return ids


@register_backend("slurm")
class Slurm(Backend):
    """Each trial a submitit job of one job array per submission; the driver submits and watches."""

    Params = SlurmParams
    jobs_outlive_driver = True
    live_job_states = frozenset(ACTIVE)

    def preflight(self, from_cli: bool) -> list[Problem]:
        """Slurm's commands must be here and slurmctld must answer."""
        if shutil.which("sbatch") is None:
            return [Problem("backend.name", "slurm: sbatch is not on PATH; run orch where Slurm's commands are")]
        try:
            slurm_command("squeue", "--noheader", "--me")
        except SlurmError as e:
            return [Problem("backend.name", f"slurm does not answer: {e}")]
        return []

    def run(self, trials: list[Trial], study_dir: Path, study: str, progress: Progress, say: Callable) -> None:
        run_slurm(trials, study_dir, study, self.params, progress, say)

    def map(self, fn: Callable[[str], Any], items: list[str], study_dir: Path, study: str) -> list[Any]:
        """One job per item, as a job array with the backend's options; waits for their results. An interrupted
        wait leaves the jobs running."""
        executor = make_executor(study_dir, study, self.params, workers=1)  # fn runs once per item
        jobs = executor.map_array(fn, items)
        try:
            return [job.result() for job in jobs]
        except submitit.core.utils.UncompletedJobError as e:
            raise SlurmError(f"a Slurm job ended without a result: {str(e).strip().splitlines()[0][:300]}") from None

    def job_scripts(self, configs: list[dict], study_dir: Path, study: str) -> list[str]:
        """One job array per worker count, as run_slurm submits them."""
        counts = Counter(self.params.trial_workers(config) for config in configs)
        return [job_script(study_dir, study, self.params, workers, jobs) for workers, jobs in counts.items()]

    def job_states(self, job_ids: list[str]) -> dict[str, str]:
        return queue_states() if job_ids else {}

    def cancel(self, trial_dirs: list[Path], say: Callable) -> None:
        if ids := cancel_jobs(trial_dirs):
            say(f"cancelled Slurm job(s) {', '.join(ids)}")
