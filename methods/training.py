"""The training loop's state and one training step: regression of every term, weighting, optimiser, EMA.

Methods only produce terms (methods/terms.py); everything else about the loss lives here, once.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor, nn

from methods.counting import CountingNet, Counts
from methods.ema import EMA
from methods.images import ImageDataset, to_uint8
from methods.interpolants import LinearInterpolant
from methods.metrics import METRICS
from methods.nets import LogVarWeight
from methods.registry import MAX_NFE, Batch, Params, Samples, Steps
from methods.terms import Method, Term

Decay = Annotated[float, Field(gt=0.0, lt=1.0)]


class TrainConfig(Params):
    steps: Steps = 3000
    batch_size: Batch = 1024
    micro_batches: PositiveInt = 1
    """Split each batch into this many equal parts, back-propagated one at a time and accumulated into one
    optimiser step: the same batch for less memory (each part draws its own times)."""
    optimizer: Literal["radam", "adam", "adamw"] = "radam"
    lr: PositiveFloat = 1e-3
    lr_decay_steps: PositiveInt | None = 35000
    """Paper A's schedule lr_k = lr / sqrt(max(k / lr_decay_steps, 1)); null keeps lr constant."""
    weight_decay: NonNegativeFloat = 0.0
    grad_clip: PositiveFloat | None = 10.0
    ema: Annotated[list[Decay], Field(min_length=1)] = [0.999]
    weighting: Literal["none", "logvar"] = "none"
    dim_reduction: Literal["auto", "sum", "mean", "mean_div_d"] = "auto"
    """How each sample's squared error is reduced over its D data dimensions: `sum` (paper A, MeanFlow, iCT),
    `mean` (paper B, shortcut models), `mean_div_d` = mean / D (sCM's reference); `auto`: the method's reference
    (docs/methods.md). grad_clip, max_loss, the learned weight and MeanFlow's adaptive c act on this scale."""
    loss_reduction: Literal["sample_mean", "term_mean"] = "sample_mean"
    """sample_mean: mean of per-sample losses over the whole batch (paper A's code); term_mean: sum over terms
    of each term's mean (paper A's Algorithm 1). They weigh the off-diagonal term differently (§3.4)."""
    seed: NonNegativeInt = 0
    log_every: PositiveInt = 50
    checkpoint_every: PositiveInt = 500
    keep_checkpoints: PositiveInt = 2
    max_loss: PositiveFloat | None = None
    """A finite loss above this also counts as divergence (null: only non-finite losses do)."""
    max_target_norm: PositiveFloat | None = None
    """A per-sample target norm above this (a target blowing up) also counts as divergence (null: off)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: PositiveInt | None = 1
    """CPU threads per trial (torch.set_num_threads); null leaves torch's default."""


class EvalConfig(Params):
    every: PositiveInt = 1000
    nfe: Annotated[list[Annotated[int, Field(gt=0, le=MAX_NFE)]], Field(min_length=1)] = [1, 2, 4, 8, 16]
    metrics: Annotated[list[str], Field(min_length=1)] = ["kl"]
    num_samples: Samples = 20000
    ema: Decay | None = None
    """Which EMA copy generates samples; null = the first of train.ema."""
    batch_size: Batch = 1000
    """Samples generated per network call during evaluation (memory, not results, depends on it)."""
    fid_reference: Samples | None = None
    """FID reference: this many training images (a fixed subset; null: all of them, as the papers do)."""
    grid: NonNegativeInt = 64
    """Images in the sample grid logged per NFE at each evaluation (image datasets; 0: none)."""


class Diverged(Exception):
    """Training stopped because the loss or the gradient blew up: a result, not a crash."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"diverged at step {step}: {reason}")
        self.step, self.reason = step, reason


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on GPU; peak resident set size (VmHWM) of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


TIME_BINS = 4
PREVIEW_POINTS = 1000
"""Samples of a low-dimensional dataset kept per NFE at each evaluation, for the dashboard's scatter plots."""


def target_std_stats(name: str, norms: Tensor, a: Tensor) -> dict[str, float]:
    """Paper B's loss-target variance for one term: the batch std of per-sample target norms, overall and per
    bin of the start time a (bin k holds a ∈ [k/4, (k+1)/4)); bins with fewer than two samples are skipped."""
    stats = {f"train/target_std/{name}": norms.std().item()}
    bins = (a.detach() * TIME_BINS).long().clamp(0, TIME_BINS - 1)
    for k in range(TIME_BINS):
        in_bin = norms[bins == k]
        if len(in_bin) > 1:
            stats[f"train/target_std/{name}/bin_{k}"] = in_bin.std().item()
    return stats


def dim_scale(reduction: str, dims: int) -> float:
    """The factor that turns a squared error summed over `dims` dimensions into train.dim_reduction's."""
    if reduction == "auto":
        raise ValueError("train.dim_reduction 'auto' must be resolved to the method's reference first")
    return {"sum": 1.0, "mean": 1 / dims, "mean_div_d": 1 / dims**2}[reduction]


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    return cls(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)


class Trainer:
    """Owns the network (behind the counting wrapper), optional learned weight, optimiser, EMA and RNG.

    `train_step` runs one step; `state_dict`/`load_state_dict` make resume exact (RNG included); `evaluate`
    samples with an EMA copy and scores the samples. A method's teacher and EMA target network are evaluated
    through the same counter as the student, so cost per sample includes them.
    """

    def __init__(
        self,
        net: nn.Module,
        method: Method,
        dataset,
        interpolant: LinearInterpolant,
        cfg: TrainConfig,
        device: torch.device,
    ):
        self.cfg, self.device = cfg, device
        self.method, self.dataset, self.interpolant = method, dataset, interpolant
        self.counts = Counts()
        self.net = CountingNet(net, self.counts).to(device)
        self.weight = LogVarWeight().to(device) if cfg.weighting == "logvar" else None
        trainable = list(self.net.parameters()) + (list(self.weight.parameters()) if self.weight else [])
        self.optimizer = make_optimizer(cfg, trainable)
        self.ema = EMA(self.net.net, cfg.ema)
        if getattr(method, "teacher", None) is not None:
            method.teacher = CountingNet(method.teacher.to(device).requires_grad_(False).eval(), self.counts)
        if hasattr(method, "ema_net"):  # methods whose targets come from the weights' EMA (shortcut)
            method.ema_net = CountingNet(self.ema.nets[cfg.ema[0]], self.counts)
        self.gen = torch.Generator(device).manual_seed(cfg.seed)
        self.step = 0
        self.samples_seen = 0
        self.train_seconds = 0.0

    def lr_at(self, step: int) -> float:
        if self.cfg.lr_decay_steps is None:
            return self.cfg.lr
        return self.cfg.lr / max(step / self.cfg.lr_decay_steps, 1.0) ** 0.5

    def weighted(self, term: Term, error: Tensor) -> Tensor:
        """Per-sample loss: the term's distance d(ℓ) times its fixed weight, then e^{−w(a,b)}·d + w(a,b) with the
        learned log-variance weight."""
        loss = term.distance(error)
        if term.weight is not None:
            loss = loss * term.weight
        if self.weight is None:
            return loss
        w = self.weight(term.a, term.b)
        return torch.exp(-w) * loss + w

    def loss(self, terms: list[Term]) -> tuple[Tensor, list[Tensor]]:
        """Total loss and each term's per-sample squared errors, reduced over dimensions (unweighted, logged)."""
        errors = [t.sq_error() * dim_scale(self.cfg.dim_reduction, t.pred[0].numel()) for t in terms]
        weighted = [self.weighted(t, e) for t, e in zip(terms, errors)]
        if self.cfg.loss_reduction == "sample_mean":
            total = torch.cat(weighted).sum() / sum(len(w) for w in weighted)
        else:
            total = sum(w.mean() for w in weighted)
        return total, errors

    def train_step(self, with_stats: bool = False) -> dict[str, float]:
        """One optimiser step over train.batch_size samples, in train.micro_batches parts. Raises Diverged on a
        non-finite (or too large) loss or gradient."""
        start = time.perf_counter()
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        x1 = self.dataset.sample(self.cfg.batch_size, self.gen)
        parts = self.cfg.micro_batches
        loss_value, logged = 0.0, {}
        for x1_part in x1.chunk(parts):
            terms = self.method.terms(self.net, x1_part, self.step, self.gen)
            loss, errors = self.loss(terms)
            self.check_loss(part_loss := loss.item(), terms)
            (loss / parts).backward()  # the mean of the parts' losses: the whole batch's loss for equal parts
            loss_value += part_loss / parts
            for term, err in zip(terms, errors) if with_stats else ():  # the whole batch's statistics
                logged.setdefault(term.name, []).append((err.detach(), term.target_norms(), term.a.detach()))
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or float("inf")).item()
        if not torch.isfinite(torch.tensor(grad_norm)):
            raise Diverged(self.step, f"non-finite gradient norm ({grad_norm})")
        self.optimizer.step()
        if with_stats and not all(torch.isfinite(p).all() for p in params):
            raise Diverged(self.step, "non-finite parameters after the optimiser step")
        self.ema.update(self.net.net, self.step)
        self.step += 1
        self.samples_seen += self.cfg.batch_size
        self.train_seconds += time.perf_counter() - start
        stats = {"train/loss": loss_value}
        if with_stats:
            stats |= {"train/grad_norm": grad_norm, "train/lr": lr}
            for name, pieces in logged.items():
                errors, norms, a = (torch.cat(piece) for piece in zip(*pieces))
                stats[f"train/loss/{name}"] = errors.mean().item()
                stats |= target_std_stats(name, norms, a)
        return stats

    def check_loss(self, loss: float, terms: list[Term]) -> None:
        """Divergence before the backward pass: a non-finite or too large loss, or a target blowing up."""
        if not math.isfinite(loss):
            raise Diverged(self.step, f"non-finite loss ({loss})")
        if self.cfg.max_loss is not None and loss > self.cfg.max_loss:
            raise Diverged(self.step, f"loss {loss:.4g} above train.max_loss {self.cfg.max_loss:g}")
        if self.cfg.max_target_norm is not None:
            for term in terms:
                if (peak := term.target_norms().max().item()) > self.cfg.max_target_norm:
                    limit = self.cfg.max_target_norm
                    raise Diverged(
                        self.step, f"{term.name} target norm {peak:.4g} above train.max_target_norm {limit:g}"
                    )

    def cost(self) -> dict[str, float]:
        """Measured cost so far: time per 1000 training samples and network evaluations per training sample."""
        n = max(self.samples_seen, 1)
        return {
            "cost/sec_per_kimg": self.train_seconds / (n / 1000),
            "cost/samples_per_sec": n / max(self.train_seconds, 1e-9),
            "cost/fwd_per_sample": self.counts.forwards / n,
            "cost/jvp_per_sample": self.counts.jvps / n,
            "cost/peak_mem_mb": peak_memory_mb(self.device),
        }

    @torch.no_grad()
    def generate(self, nfe: int, evaluation: EvalConfig) -> Tensor:
        """eval.num_samples samples with the EMA copy at `nfe`, from the same base noise at every NFE and every
        evaluation (samplers that re-noise draw from a second generator, so the base noise stays the same);
        image samples come back as uint8 pixels on the CPU."""
        net = self.ema.nets[evaluation.ema if evaluation.ema is not None else self.cfg.ema[0]]
        base = torch.Generator(self.device).manual_seed(self.cfg.seed + 1_000_003)
        renoise = torch.Generator(self.device).manual_seed(self.cfg.seed + 2_000_003)
        chunks = []
        for start in range(0, evaluation.num_samples, evaluation.batch_size):
            n = min(evaluation.batch_size, evaluation.num_samples - start)
            x = self.method.sample(net, self.interpolant.sample_base(n, self.dataset.shape, base), nfe, renoise)
            chunks.append(to_uint8(x).cpu() if isinstance(self.dataset, ImageDataset) else x)
        return torch.cat(chunks)

    def evaluate(self, evaluation: EvalConfig) -> tuple[dict[str, float], dict[int, Tensor]]:
        """Each metric at each NFE (`eval/<metric>/nfe_<N>`), and a preview of the samples per NFE: the first
        eval.grid images (uint8, (n, C, H, W)) of an image dataset, the first PREVIEW_POINTS points otherwise."""
        results, previews = {}, {}
        for nfe in evaluation.nfe:
            samples = self.generate(nfe, evaluation)
            for name in evaluation.metrics:
                metric = METRICS.get(name).build
                results[f"eval/{name}/nfe_{nfe}"] = metric(samples, self.dataset, evaluation, self.device)
            images = isinstance(self.dataset, ImageDataset)
            if count := evaluation.grid if images else PREVIEW_POINTS:
                previews[nfe] = samples[:count].detach().cpu()
        return results, previews

    def state_dict(self) -> dict:
        return {
            "net": self.net.net.state_dict(),
            "weight": self.weight.state_dict() if self.weight else None,
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "gen": self.gen.get_state(),
            "step": self.step,
            "samples_seen": self.samples_seen,
            "train_seconds": self.train_seconds,
            "forwards": self.counts.forwards,
            "jvps": self.counts.jvps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.net.load_state_dict(state["net"])
        if self.weight is not None:
            self.weight.load_state_dict(state["weight"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.gen.set_state(state["gen"])
        self.step = state["step"]
        self.samples_seen = state["samples_seen"]
        self.train_seconds = state["train_seconds"]
        self.counts.forwards, self.counts.jvps = state["forwards"], state["jvps"]
