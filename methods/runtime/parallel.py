"""Data parallelism that reproduces one device: every rank draws the whole batch's randomness, keeps its rows.

A data-parallel step over a global batch of B samples on W ranks gives rank r the rows r, r + W, r + 2W, … of
the batch one process would draw (its data, times, noise, guidance scales). Each rank makes the same draws, of
the global size, from a generator in the same state, and keeps its strided rows; so the ranks' generators never
diverge, one generator state describes all of them, and W ranks × B/W samples are 1 rank × B samples up to the
order of floating-point sums. Strided rows (not contiguous blocks) keep a method's split of its batch exact: the
first k of a rank's n rows are the first k·W of the global batch when k·W is the global split (`split_count`).

Methods draw through the functions below with a plain torch.Generator (one process, exactly torch's own draws)
or a ShardedGenerator (one rank of W). Gradients are averaged with one all-reduce of the flattened gradients
per optimiser step (`average_gradients`) rather than DDP's hooks: the JVP methods run several forward and
forward-mode passes per step, outside DDP's one-forward-one-backward contract (docs/parallel.md).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass
class ShardedGenerator:
    """A generator shared by W ranks (each rank holds one in the same state), and this rank's place among them."""

    gen: torch.Generator
    rank: int = 0
    world: int = 1

    @property
    def device(self) -> torch.device:
        return self.gen.device

    def get_state(self) -> Tensor:
        return self.gen.get_state()

    def set_state(self, state: Tensor) -> None:
        self.gen.set_state(state)


Gen = torch.Generator | ShardedGenerator


def unsharded(gen: Gen) -> tuple[torch.Generator, int, int]:
    """(torch generator, rank, world) of either kind (a plain generator is rank 0 of 1)."""
    if isinstance(gen, ShardedGenerator):
        return gen.gen, gen.rank, gen.world
    return gen, 0, 1


def rows(draw, gen: Gen, n: int) -> Tensor:
    """draw(torch_generator, global_count) restricted to this rank's n rows (dim 0)."""
    torch_gen, rank, world = unsharded(gen)
    if world == 1:
        return draw(torch_gen, n)
    return draw(torch_gen, n * world)[rank::world].contiguous()


def rand(gen: Gen, n: int, *shape: int, device: torch.device | None = None) -> Tensor:
    """U[0, 1) draws of shape (n, *shape): this rank's rows of the global batch's."""
    return rows(lambda g, m: torch.rand(m, *shape, generator=g, device=device or g.device), gen, n)


def shared_rand(gen: Gen) -> float:
    """One U[0, 1) draw for the whole step, the same on every rank (a per-step decision)."""
    torch_gen, _, _ = unsharded(gen)
    return torch.rand(1, generator=torch_gen, device=torch_gen.device).item()


def randn(gen: Gen, n: int, *shape: int, device: torch.device | None = None) -> Tensor:
    """N(0, 1) draws of shape (n, *shape): this rank's rows of the global batch's."""
    return rows(lambda g, m: torch.randn(m, *shape, generator=g, device=device or g.device), gen, n)


def randint(gen: Gen, high: int, n: int, device: torch.device | None = None) -> Tensor:
    """Integers uniform on [0, high), shape (n,): this rank's rows of the global batch's."""
    return rows(lambda g, m: torch.randint(high, (m,), generator=g, device=device or g.device), gen, n)


def multinomial(gen: Gen, probs: Tensor, n: int) -> Tensor:
    """n category indices drawn with replacement from `probs` (k,), on the generator's device."""
    return rows(lambda g, m: torch.multinomial(probs, m, replacement=True, generator=g), gen, n)


def positions(gen: Gen, n: int, device: torch.device | None = None) -> Tensor:
    """The global batch positions (n,) of this rank's n rows: what a method that assigns something by batch
    position (a step size per row) must index by."""
    _, rank, world = unsharded(gen)
    return torch.arange(n, device=device) * world + rank


def split_count(gen: Gen, n: int, count) -> int:
    """A method's split of its batch into a first part and the rest: `count(global_n)` rows of the global batch,
    of which this rank holds 1/W (the first rows of its n). When W does not divide that count, it is rounded
    down to a multiple of W (fewer than W rows move to the rest, which one process would not do), with a
    warning."""
    _, _, world = unsharded(gen)
    total = count(n * world)
    if total % world:
        warn_uneven_split(n * world, total, world)
    return total // world


@functools.cache
def warn_uneven_split(batch: int, total: int, world: int) -> None:
    log.warning(
        "a batch of %d splits into %d + %d rows, which %d data-parallel workers cannot share equally: the first "
        "part is rounded down to %d rows (one worker would use %d); choose the batch size or the fraction so "
        "that both parts are multiples of %d for results equal to one worker's",
        batch, total, batch - total, world, total - total % world, total, world,
    )  # fmt: skip


def world_of() -> tuple[int, int]:
    """(rank, world size) of this process's torch.distributed group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Replace every gradient by its mean over the ranks: one all-reduce of all of them, flattened (every rank
    has gradients for the same parameters: the same code path on the same shapes)."""
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_over_ranks(value: Tensor, world: int) -> Tensor:
    """The mean of a tensor over the ranks (itself on one)."""
    if world == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world


def max_over_ranks(value: Tensor, world: int) -> Tensor:
    """The elementwise maximum of a tensor over the ranks."""
    if world == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def gather_rows(value: Tensor, world: int) -> Tensor:
    """Every rank's rows (n, …) as the global batch's (n·W, …) in global order (row j of rank r is global row
    j·W + r)."""
    if world == 1:
        return value
    parts = [torch.empty_like(value) for _ in range(world)]
    dist.all_gather(parts, value.contiguous())
    return torch.stack(parts, dim=1).flatten(0, 1)
