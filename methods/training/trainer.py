"""The training loop's state and one training step: regression of every term, weighting, optimiser, EMA.

Methods only produce terms (methods/contracts/method.py); everything else about the loss lives here, once.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor, nn

from orch.methods.contracts.counting import CountingNet, Counts
from orch.methods.contracts.guidance import Condition, drop_labels, num_classes_of
from orch.methods.contracts.jvp import JvpConfig
from orch.methods.contracts.method import Method, Setting, Term
from orch.methods.contracts.metric_keys import (
    AMP_SKIPPED,
    GRAD_NORM,
    JVP_UNRESOLVED,
    LOSS_SCALE,
    LR,
    TRAIN_LOSS,
    cost_key,
    target_std_key,
    term_loss_key,
)
from orch.methods.contracts.registry import Batch, Params, Steps
from orch.methods.evaluation.generation import Decay, EvalConfig, evaluate
from orch.methods.runtime.parallel import (
    Gen,
    ShardedGenerator,
    average_gradients,
    gather_rows,
    max_over_ranks,
    mean_over_ranks,
    world_of,
)
from orch.methods.runtime.precision import Precision, autocast, grad_scaler, resolve_precision, set_matmul_precision
from orch.methods.training.ema import EMA
from orch.methods.training.loss_weight import LogVarWeight


class TrainConfig(Params):
    """The `train` section: optimisation, EMA, loss scale, seed, logging and checkpointing."""

    steps: Steps = 3000
    """Optimiser steps."""
    batch_size: Batch = 1024
    """Training samples per step."""
    micro_batches: PositiveInt = 1
    """Split each batch into this many equal parts, back-propagated one at a time and accumulated into one
    optimiser step: the same batch for less memory (each part draws its own times)."""
    optimizer: Literal["radam", "adam", "adamw"] = "radam"
    """RAdam (the self-distillation paper's choice), Adam or AdamW."""
    lr: PositiveFloat = 1e-3
    """Learning rate."""
    lr_decay_steps: PositiveInt | None = 35000
    """Paper A's schedule lr_k = lr / sqrt(max(k / lr_decay_steps, 1)); null keeps lr constant."""
    weight_decay: NonNegativeFloat = 0.0
    """Weight decay of the optimiser."""
    grad_clip: PositiveFloat | None = 10.0
    """Clip the global gradient norm to this; null: no clipping."""
    ema: Annotated[list[Decay], Field(min_length=1)] = [0.999]
    """EMA decays tracked; the decay at step k is min(δ, (1 + k)/(10 + k))."""
    weighting: Literal["none", "logvar"] = "none"
    """`logvar`: a learned log-variance weight e^{−w(a,b)}·ℓ + w(a,b) (docs/methods.md §2.2); `none`: ℓ."""
    dim_reduction: Literal["auto", "sum", "mean", "mean_div_d"] = "auto"
    """How each sample's squared error is reduced over its D data dimensions: `sum` (paper A, MeanFlow, iCT),
    `mean` (paper B, shortcut models), `mean_div_d` = mean / D (sCM's reference); `auto`: the method's reference
    (docs/methods.md). grad_clip, max_loss, the learned weight and MeanFlow's adaptive c act on this scale."""
    loss_reduction: Literal["sample_mean", "term_mean"] = "sample_mean"
    """sample_mean: mean of per-sample losses over the whole batch (paper A's code); term_mean: sum over terms
    of each term's mean (paper A's Algorithm 1). They weigh the off-diagonal term differently (§3.4)."""
    label_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    """Class-conditional data: the fraction of labels replaced by the null class, so that one network learns the
    conditional and the unconditional velocity (classifier-free guidance). Unused without dataset.conditional
    and by a method trained with online CFG."""
    seed: NonNegativeInt = 0
    """Seeds the network's initialisation, the data, the times and the noise; a resume restores the RNG."""
    log_every: PositiveInt = 50
    """Steps between logged training statistics (loss, gradient norm, target std, cost)."""
    checkpoint_every: PositiveInt = 500
    """Steps between checkpoints: an interruption loses at most this many."""
    keep_checkpoints: PositiveInt = 2
    """Newest checkpoints kept in the trial directory."""
    max_loss: PositiveFloat | None = None
    """A finite loss above this also counts as divergence (null: only non-finite losses do)."""
    max_target_norm: PositiveFloat | None = None
    """A per-sample target norm above this (a target blowing up) also counts as divergence (null: off)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: cuda when available, else cpu."""
    workers: PositiveInt | None = None
    """Data-parallel workers of this trial (docs/parallel.md), each taking batch_size / workers of every batch;
    null: the backend's (`workers_per_trial`; on Slurm nodes × tasks_per_node). How a trial runs, not what it
    trains: W workers × B/W train as one worker × B, so the trial keeps its id."""
    threads: PositiveInt | None = 1
    """CPU threads per trial (torch.set_num_threads); null leaves torch's default."""
    precision: Precision = "auto"
    """Numerics of the network passes: `fp32`; `tf32` (fp32 with TF32 matrix products on Ampere or newer GPUs);
    `bf16` or `fp16` autocast (master weights, optimiser state, EMA, time embeddings and the loss stay fp32; fp16
    adds a dynamic loss scaler whose skipped steps are logged as train/amp_skipped_steps); `auto`: bf16 on a GPU,
    fp32 on CPU (docs/performance.md)."""
    jvp: JvpConfig = JvpConfig()
    """How methods that differentiate the network along time compute that JVP: forward-mode AD or finite
    differences, and its precision (docs/methods.md, "JVP back-ends")."""
    compile: bool = False
    """torch.compile the networks (student, teacher, EMA target); JVP passes run the uncompiled network, since
    forward-mode AD does not pass through compiled graphs."""
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    """Layout of image tensors: `auto` is channels_last for image networks on a GPU (faster convolutions in
    half precision), contiguous otherwise."""


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


def target_std_stats(name: str, norms: Tensor, a: Tensor) -> dict[str, float]:
    """Paper B's loss-target variance for one term: the batch std of per-sample target norms, overall and per
    bin of the start time a (bin k holds a ∈ [k/4, (k+1)/4)); bins with fewer than two samples are skipped."""
    stats = {target_std_key(name): norms.std().item()}
    bins = (a.detach() * TIME_BINS).long().clamp(0, TIME_BINS - 1)
    for k in range(TIME_BINS):
        in_bin = norms[bins == k]
        if len(in_bin) > 1:
            stats[target_std_key(name, k)] = in_bin.std().item()
    return stats


def dim_scale(reduction: str, dims: int) -> float:
    """The factor that turns a squared error summed over `dims` dimensions into train.dim_reduction's."""
    if reduction == "auto":
        raise ValueError("train.dim_reduction 'auto' must be resolved to the method's reference first")
    return {"sum": 1.0, "mean": 1 / dims, "mean_div_d": 1 / dims**2}[reduction]


MIN_LOSS_SCALE = 2.0**-10
"""fp16: a dynamic loss scale that has halved below this found non-finite gradients at every scale: divergence."""


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """The optimiser; on a GPU the fused kernel where torch has one (Adam, AdamW), else its multi-tensor one."""
    cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    fast = {"fused": True} if device.type == "cuda" and cls is not torch.optim.RAdam else {}
    return cls(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay, **fast)


def local_batch_size(cfg: TrainConfig, world: int) -> int:
    """This rank's share of train.batch_size; it must split into train.micro_batches equal parts."""
    if cfg.batch_size % (world * cfg.micro_batches):
        raise ValueError(
            f"train.batch_size {cfg.batch_size} does not split into {world} worker(s) × {cfg.micro_batches} "
            "micro-batch(es) of equal size"
        )
    return cfg.batch_size // world


def uses_channels_last(cfg: TrainConfig, data_shape: tuple[int, ...], device: torch.device) -> bool:
    if cfg.memory_format == "auto":
        return len(data_shape) == 3 and device.type == "cuda"
    return cfg.memory_format == "channels_last"


def compiled(net: nn.Module, enabled: bool) -> nn.Module:
    """`net` with its module call compiled in place (parameters and state-dict keys unchanged); `net.forward`
    stays the eager function, which is what forward-mode AD passes take (methods/contracts/counting.py)."""
    if enabled:
        net.compile()
    return net


def weights_digest(net: nn.Module) -> str:
    """sha256 of a network's named tensors: which weights a frozen network had, whatever file they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
    return digest.hexdigest()


class Trainer:
    """The training step and its state: the network (behind the counting wrapper), the method, the optional
    learned weight, the optimiser, the EMA copies and the RNG.

    `train_step` runs one step; `state_dict`/`load_state_dict` make resume exact (RNG included). The method is
    built here, from `make_method(setting)`, with the networks it needs handed over already counted: the
    teacher (frozen) and the first EMA copy, so that a training sample's cost includes their evaluations.
    """

    def __init__(
        self,
        net: nn.Module,
        make_method: Callable[[Setting], Method],
        setting: Setting,
        dataset,
        cfg: TrainConfig,
        device: torch.device,
    ):
        self.cfg, self.device, self.dataset, self.interpolant = cfg, device, dataset, setting.interpolant
        self.rank, self.world = world_of()
        self.local_batch = local_batch_size(cfg, self.world)
        self.precision = resolve_precision(cfg.precision, device)
        set_matmul_precision(self.precision)
        self.memory_format = torch.channels_last if uses_channels_last(cfg, dataset.shape, device) else None
        self.counts, self.condition = Counts(), Condition()
        self.net = CountingNet(self.placed(net), self.counts, self.condition, jvp=cfg.jvp)
        self.weight = LogVarWeight().to(device) if cfg.weighting == "logvar" else None
        self.params = list(self.net.parameters()) + (list(self.weight.parameters()) if self.weight else [])
        self.optimizer = make_optimizer(cfg, self.params, device)
        self.scaler = grad_scaler(self.precision, device)
        self.amp_skipped_steps = 0
        self.ema = EMA(self.net.net, cfg.ema)
        self.priors = {
            role: weights_digest(net)
            for role, net in (("teacher", setting.teacher), ("guide", setting.guide), ("stage", setting.stage))
            if net is not None
        }
        teacher, guide, stage = (self.frozen(n) for n in (setting.teacher, setting.guide, setting.stage))
        self.ema_targets: list[CountingNet] = []
        ema_target = self.counted_ema_copy(cfg.ema[0])
        compiled(self.net.net, cfg.compile)
        setting = replace(
            setting, teacher=teacher, guide=guide, stage=stage, ema_target=ema_target, ema_copy=self.counted_ema_copy
        )
        self.method = make_method(setting)
        # the student and its EMA copies embed the guidance scale under online CFG; the teacher never does
        for net in [self.net, *self.ema_targets]:
            net.takes_omega = self.method.embedded_guidance is not None
        # The same generator state on every data-parallel rank: each draws the whole batch, keeps its rows. One
        # process gets torch's own generator (a plugin that calls torch.rand(…, generator=gen) keeps working).
        self.gen: Gen = torch.Generator(device).manual_seed(cfg.seed)
        if self.world > 1:
            self.gen = ShardedGenerator(self.gen, self.rank, self.world)
        self.step = 0
        self.samples_seen = 0
        self.train_seconds = 0.0

    def frozen(self, net: nn.Module | None) -> CountingNet | None:
        """A teacher (autoguidance's weak teacher, a prior stage) on the trainer's device, without gradients, in
        eval mode, behind the shared counter and condition."""
        if net is None:
            return None
        net = self.placed(net).requires_grad_(False).eval()
        return CountingNet(compiled(net, self.cfg.compile), self.counts, self.condition, jvp=self.cfg.jvp)

    def counted_ema_copy(self, decay: float) -> CountingNet:
        """The EMA copy of `decay` behind the shared counter and condition (added when train.ema lacks it: it is
        then a training target only, saved with the others, never evaluated)."""
        if decay not in self.ema.nets:
            self.ema.add(self.net.net, decay)
        copy = CountingNet(
            compiled(self.ema.nets[decay], self.cfg.compile), self.counts, self.condition, jvp=self.cfg.jvp
        )
        self.ema_targets.append(copy)
        return copy

    def placed(self, net: nn.Module) -> nn.Module:
        """`net` on the trainer's device, in its memory format."""
        return net.to(self.device, memory_format=self.memory_format or torch.preserve_format)

    def lr_at(self, step: int) -> float:
        if self.cfg.lr_decay_steps is None:
            return self.cfg.lr
        return self.cfg.lr / max(step / self.cfg.lr_decay_steps, 1.0) ** 0.5

    def weighted(self, term: Term, error: Tensor) -> Tensor:
        """Per-sample loss: the term's distance d(ℓ) times its fixed weight, then e^{−w(a,b)}·d + w(a,b) with the
        learned log-variance weight."""
        loss = term.weighted(error)
        if self.weight is None:
            return loss
        w = self.weight(term.a, term.b)
        return torch.exp(-w) * loss + w

    def loss(self, terms: list[Term]) -> tuple[Tensor, list[Tensor]]:
        """Total loss and each term's per-sample errors, reduced over dimensions (unweighted, logged)."""
        errors = [t.error(dim_scale(self.cfg.dim_reduction, t.pred[0].numel())) for t in terms]
        weighted = [self.weighted(t, e) for t, e in zip(terms, errors)]
        if self.cfg.loss_reduction == "sample_mean":
            total = torch.cat(weighted).sum() / sum(len(w) for w in weighted)
        else:
            total = sum(w.mean() for w in weighted)
        return total, errors

    def train_step(self, with_stats: bool = False) -> dict[str, float]:
        """One optimiser step over train.batch_size samples, in train.micro_batches parts; returns the training
        statistics when `with_stats` (a log tick), else {}.

        Values are read from the device only at log ticks (one host sync per tick, not per step), so a
        non-finite loss or gradient between ticks is caught at the next tick as non-finite parameters (raised
        as Diverged). train.max_loss and train.max_target_norm check every step, at one sync each.

        Data-parallel (methods/runtime/parallel.py): this rank's rows of the batch; gradients are averaged over the
        ranks before the optimiser step, and every check and statistic is of the whole batch, so that all
        ranks take the same decisions."""
        start = time.perf_counter()
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        x1, labels = self.draw_batch()
        parts = self.cfg.micro_batches
        checked = with_stats or self.cfg.max_loss is not None or self.cfg.max_target_norm is not None
        loss_sum, logged = torch.zeros((), device=self.device), {}
        for i, x1_part in enumerate(x1.chunk(parts)):
            self.condition.labels = None if labels is None else labels.chunk(parts)[i]
            self.condition.omega = None
            with autocast(self.precision, self.device):
                terms = self.method.terms(self.net, x1_part, self.step, self.gen)
            loss, errors = self.loss(terms)  # outside autocast: fp32 (Term.sq_error)
            if checked:
                self.check_loss(loss.detach(), terms)
            self.scaler.scale(loss / parts).backward()  # the mean of equal parts' losses: the whole batch's loss
            loss_sum += loss.detach() / parts
            for term, err in zip(terms, errors) if with_stats else ():  # the whole batch's statistics
                logged.setdefault(term.name, []).append((err.detach(), term.target_norms(), term.a.detach()))
        average_gradients(self.params, self.world)
        grad_norm, skipped = self.optimizer_step()
        self.ema.update(self.net.net, self.step)
        self.step += 1
        self.samples_seen += self.cfg.batch_size
        self.train_seconds += time.perf_counter() - start
        if not with_stats:
            return {}
        grad_norm = grad_norm.item()
        if not skipped and not math.isfinite(grad_norm):
            raise Diverged(self.step - 1, f"non-finite gradient norm ({grad_norm})")
        self.check_finite()
        loss_mean = mean_over_ranks(loss_sum, self.world).item()
        stats = {TRAIN_LOSS: loss_mean, GRAD_NORM: grad_norm, LR: lr}
        if self.scaler.is_enabled():
            stats |= {AMP_SKIPPED: self.amp_skipped_steps, LOSS_SCALE: self.scaler.get_scale()}
        if self.cfg.jvp.mode == "finite_difference":
            unresolved = torch.tensor(float(self.counts.unresolved), device=self.device)
            stats[JVP_UNRESOLVED] = round(mean_over_ranks(unresolved, self.world).item() * self.world)
        for name, pieces in logged.items():
            errors, norms, a = (gather_rows(torch.cat(piece), self.world) for piece in zip(*pieces))
            stats[term_loss_key(name)] = errors.mean().item()
            stats |= target_std_stats(name, norms, a)
        return stats

    def optimizer_step(self) -> tuple[Tensor, bool]:
        """Unscale (fp16), clip and apply the gradient; returns the gradient norm before clipping (a device
        tensor) and whether the fp16 loss scaler skipped the step for non-finite gradients (counted, not
        divergence, unless the scale collapses below MIN_LOSS_SCALE)."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or float("inf"))
        if not self.scaler.is_enabled():
            self.optimizer.step()
            return grad_norm, False
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = self.scaler.get_scale() < scale  # the scale only shrinks when the step was skipped
        self.amp_skipped_steps += skipped
        if self.scaler.get_scale() < MIN_LOSS_SCALE:
            raise Diverged(self.step, f"fp16 loss scale below {MIN_LOSS_SCALE:g}: non-finite gradients at every scale")
        return grad_norm, skipped

    def check_finite(self) -> None:
        """Raise Diverged when a parameter is inf or NaN (one host sync)."""
        if not torch.stack([torch.isfinite(p).all() for p in self.params]).all():
            raise Diverged(self.step, "non-finite parameters after the optimiser step")

    def draw_batch(self) -> tuple[Tensor, Tensor | None]:
        """train.batch_size data samples and, for conditional data, their labels with train.label_dropout of them
        replaced by the null class (not for a method that embeds guidance: its teacher target is guided)."""
        if num_classes_of(self.dataset) is None:
            return self.placed(self.dataset.sample(self.local_batch, self.gen)), None
        x1, labels = self.dataset.sample_labelled(self.local_batch, self.gen)
        x1 = self.placed(x1)
        if self.method.embedded_guidance is None and self.cfg.label_dropout > 0:
            labels = drop_labels(labels, self.cfg.label_dropout, self.dataset.num_classes, self.gen)
        return x1, labels

    def check_loss(self, loss: Tensor, terms: list[Term]) -> None:
        """Divergence before the backward pass: a non-finite or too large loss (of the whole batch), or a target
        blowing up (anywhere in it)."""
        loss = mean_over_ranks(loss, self.world).item()
        if not math.isfinite(loss):
            raise Diverged(self.step, f"non-finite loss ({loss})")
        if self.cfg.max_loss is not None and loss > self.cfg.max_loss:
            raise Diverged(self.step, f"loss {loss:.4g} above train.max_loss {self.cfg.max_loss:g}")
        if self.cfg.max_target_norm is not None:
            for term in terms:
                peak = max_over_ranks(term.target_norms().max(), self.world).item()
                if peak > self.cfg.max_target_norm:
                    limit = self.cfg.max_target_norm
                    raise Diverged(
                        self.step, f"{term.name} target norm {peak:.4g} above train.max_target_norm {limit:g}"
                    )

    def cost(self) -> dict[str, float]:
        """Measured cost so far: time per 1000 training samples and network evaluations per training sample."""
        n = max(self.samples_seen, 1)
        local = n / self.world  # the counts are this rank's evaluations, of its share of the samples
        measured = {
            "sec_per_kimg": self.train_seconds / (n / 1000),
            "samples_per_sec": n / max(self.train_seconds, 1e-9),
            "fwd_per_sample": self.counts.forwards / local,
            "jvp_per_sample": self.counts.jvps / local,
            "peak_mem_mb": peak_memory_mb(self.device),
        }
        return {cost_key(name): value for name, value in measured.items()}

    def ema_net(self, decay: float | None = None) -> nn.Module:
        """The EMA copy of `decay` (None: the first of train.ema): what samples at evaluation."""
        return self.ema.nets[decay if decay is not None else self.cfg.ema[0]]

    def evaluate(self, evaluation: EvalConfig) -> tuple[dict[str, float], dict[int, Tensor]]:
        """evaluation.generation.evaluate of this trainer's method with its EMA copy eval.ema, seeded by train.seed."""
        net = self.ema_net(evaluation.ema)
        self.check_finite()
        return evaluate(self.method, net, self.interpolant, self.dataset, evaluation, self.cfg.seed, self.device)

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
            "unresolved": self.counts.unresolved,
            "scaler": self.scaler.state_dict(),
            "amp_skipped_steps": self.amp_skipped_steps,
            "priors": self.priors,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint; raises ValueError when a frozen network it was trained with (teacher, weak teacher,
        prior stage) has other weights now, e.g. a named teacher file replaced since the trial started."""
        for role, digest in state.get("priors", {}).items():  # absent from checkpoints before stages existed
            if role in self.priors and self.priors[role] != digest:
                raise ValueError(
                    f"the {role} has other weights than when this trial's checkpoint at step {state['step']} was "
                    f"written (weights digest {digest[:12]}, now {self.priors[role][:12]}): its file was replaced; "
                    "restore it, or name the new one in a new study"
                )
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
        self.counts.unresolved = state.get("unresolved", 0)  # absent from checkpoints before train.jvp existed
        if state.get("scaler"):  # absent from checkpoints written before train.precision existed
            self.scaler.load_state_dict(state["scaler"])
        self.amp_skipped_steps = state.get("amp_skipped_steps", 0)
