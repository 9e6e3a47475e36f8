"""A data-parallel smoke under torchrun: the process group (NCCL on GPUs, gloo on CPU), one all-reduce checked
against its exact value, then a few training steps of a small trial in that group, timed.

torchrun --nproc_per_node 1 bench/nccl_smoke.py [--device cuda] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.image_cost import build, synchronize  # noqa: E402
from orch.trial.config import resolve_trial_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(value)
    assert torch.all(value == world * (world + 1) / 2), "all-reduce gave a wrong sum"
    config, problems = resolve_trial_config(
        {"method": {"name": "lsd"}, "train": {"batch_size": 256 * world, "device": device.type}}
    )
    assert not problems, problems
    trainer = build(config, device)
    trainer.train_step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = trainer.train_step(with_stats=True)["train/loss"]
    synchronize(device)
    if rank == 0:
        print(f"{dist.get_backend()} world {world}: all-reduce exact; LSD checker MLP {args.steps} steps, "
              f"{1000 * (time.perf_counter() - start) / args.steps:.1f} ms/step, last loss {loss:.4f}")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
