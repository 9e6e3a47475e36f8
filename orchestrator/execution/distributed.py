"""The process group of a data-parallel trial: N local processes (torch.multiprocessing), or the ranks a
scheduler started (Slurm tasks through submitit, Ray Train workers), each joining one torch.distributed group.
NCCL on GPUs, gloo on CPUs; the training step itself is in methods/runtime/parallel.py."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orch.execution.processes import record_process

TIMEOUT = timedelta(hours=2)
"""How long a rank waits in a collective: rank 0 alone computes an evaluation's metrics, and on first use the
reference images' Inception features (minutes on a CPU), while the others wait for its word at the end of the
tick."""


def backend_for(device: str) -> str:
    """NCCL when the ranks train on GPUs, gloo otherwise."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def join_group(rank: int, world: int, init_method: str, device: str) -> None:
    """Join the trial's process group as `rank` of `world` (and take GPU `rank` of this node's, on GPUs)."""
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=TIMEOUT)


def lead_says_stop(stop: bool, device: torch.device) -> bool:
    """Rank 0 tells every rank whether the trial stops here (its own `stop`); the others pass False and get
    rank 0's word. One small broadcast per log, evaluation or checkpoint tick."""
    flag = torch.tensor([int(stop)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(rank: int, world: int, init_method: str, device: str) -> Iterator[None]:
    """The trial's process group, joined for the body as `rank` of `world`; after a body that ended normally,
    every rank waits for the others (no rank tears its connections down while another still uses them)."""
    join_group(rank, world, init_method, device)
    try:
        yield
        dist.barrier()
    finally:
        leave_group()


def local_rank_main(rank: int, fn: Callable, world: int, init_method: str, device: str, args: tuple) -> None:
    record_process()  # a killed driver's ranks would go on training
    torch.set_num_threads(1)
    with process_group(rank, world, init_method, device):
        fn(*args)
    # A finished rank exits without the interpreter's teardown: gloo's threads, destroyed there, abort the
    # process now and then ("terminate called without an active exception") after all the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_local_ranks(fn: Callable, world: int, device: str, *args, poll: Callable[[], None] | None = None) -> None:
    """fn(*args) in `world` new processes on this machine, one rank each of a fresh process group (a file
    rendezvous: no port is opened), calling poll() every POLL_SECONDS while they run; raises when a rank
    fails. fn must be importable (module level)."""
    with tempfile.TemporaryDirectory(prefix="orch-ranks-") as tmp:
        init_method = Path(tmp, "rendezvous").as_uri()
        ranks = mp.start_processes(
            local_rank_main,
            args=(fn, world, init_method, device, args),
            nprocs=world,
            start_method="spawn",
            join=False,
        )
        while not ranks.join(timeout=POLL_SECONDS):
            if poll is not None:
                poll()


POLL_SECONDS = 2.0
