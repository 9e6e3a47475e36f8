"""What may reach sbatch from a study: single-line values, and the long options Slurm's sbatch knows that orch
does not set itself. Imports nothing of Slurm or submitit (studies are checked where Slurm is absent)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

from orch.problems import did_you_mean


def one_line(value: str) -> str:
    if not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"must be one non-empty line without control characters (got {value!r})")
    return value


Line = Annotated[str, AfterValidator(one_line)]
"""A value written into the job script: one line (a newline would start a new line of the script)."""

SBATCH_OPTIONS = frozenset(
    "account acctg-freq array batch bb bbf begin chdir cluster-constraint clusters comment constraint container "
    "contiguous core-spec cores-per-socket cpu-freq cpus-per-gpu cpus-per-task deadline delay-boot dependency "
    "distribution error exclude exclusive export export-file extra-node-info get-user-env gid gpu-bind gpu-freq "
    "gpus gpus-per-node gpus-per-socket gpus-per-task gres gres-flags hint hold ignore-pbs input job-name "
    "kill-on-invalid-dep licenses mail-type mail-user mcs-label mem mem-bind mem-per-cpu mem-per-gpu mincpus "
    "network nice no-kill no-requeue nodefile nodelist nodes ntasks ntasks-per-core ntasks-per-gpu "
    "ntasks-per-node ntasks-per-socket open-mode output overcommit oversubscribe partition power prefer priority "
    "profile propagate qos reboot requeue reservation signal sockets-per-node spread-job switches thread-spec "
    "threads-per-core time time-min tmp tres-per-task uid use-min-nodes wait-all-nodes wckey".split()
)
"""sbatch's long options (Slurm 22.05 `sbatch --help`, and its manual's that the help omits), less those that
only print or change how sbatch itself reports (help, usage, version, parsable, quiet, verbose, wait, wrap)."""

SET_BY_ORCH = {
    "job-name": "orch names each job orch-<study>",
    "time": "use backend.timeout_min",
    "nodes": "use backend.nodes",
    "ntasks-per-node": "use backend.tasks_per_node",
    "cpus-per-task": "use backend.cpus_per_task",
    "gpus-per-node": "use backend.gpus_per_node",
    "mem": "use backend.mem_gb",
    "partition": "use backend.partition",
    "account": "use backend.account",
    "qos": "use backend.qos",
    "constraint": "use backend.constraint",
    "exclusive": "use backend.exclusive",
    "reservation": "use backend.reservation",
    "array": "orch submits a study's trials as one job array (backend.array_parallelism limits it)",
    "output": "orch keeps each job's log in <study>/slurm/<job id>/",
    "error": "orch keeps each job's log in <study>/slurm/<job id>/",
    "open-mode": "a requeued job appends to its log",
    "signal": "a job is signalled before its time limit to checkpoint and requeue",
    "wckey": "submitit sets it",
}
"""sbatch options orch writes itself, each with where to set it instead."""


def option_problem(key: str) -> str | None:
    """Why `key` cannot be one of backend.additional_parameters (None: it can)."""
    if key in SET_BY_ORCH:
        return f"sbatch --{key} is set by orch: {SET_BY_ORCH[key]}"
    if key not in SBATCH_OPTIONS:
        known = sorted(SBATCH_OPTIONS - SET_BY_ORCH.keys())
        return f"--{key} is not an sbatch long option{did_you_mean(key, known)}"
    return None
