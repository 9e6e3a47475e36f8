"""Consistency mid-training (CMT): a consistency model regressed onto the trajectories of a teacher's ODE solver
(docs/methods.md §10.6).

Each step the frozen teacher integrates B/M trajectories with M steps of DPM-Solver++(2M) from the largest noise
level σ_max to σ_min (EDM's noise levels, log-SNR-uniform), each started at I_{τ(σ_max)} of a data point; the
student's flow map to data maps every one of the M points of a trajectory to that trajectory's end:
    f_θ(x̂_{σ_i}; τ_i) = X_θ(x̂_{σ_i}; τ_i, 1) ≈ x̂_{σ_min},   i = 1..M.
The target is fixed (no stop-gradient question). CMT uses this stage to start ECT (`ect` with `mid_training`);
trained on its own it is a consistency model with the multistep consistency sampler.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat
from torch import Tensor, nn

from orch.methods.contracts.conventions import edm_to_canonical, sigma_max_time
from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.flow_map import jump, sample_consistency
from orch.methods.contracts.method import L2, Distance, Method, Setting, Term, register_method
from orch.methods.contracts.teacher import DistillationParams, DistilsTeacher, Velocity
from orch.methods.runtime.parallel import Gen

CMT = """Z. Hu, C.-H. Lai, Y. Mitsufuji, S. Ermon, "CMT: Mid-Training for Efficient Learning of Consistency, Mean
    Flow, and Flow Map Models", arXiv:2509.24526, 2025."""


class CMTParams(DistillationParams):
    nfe: Annotated[int, Field(ge=2, le=64)] = 16
    """M: teacher-solver steps per trajectory, so a batch of B pairs holds B/M trajectories (CIFAR-10: 16)."""
    sigma_max: PositiveFloat = 80.0
    """Where trajectories (and the sampler) start."""
    sigma_min: PositiveFloat = 0.002
    """Where trajectories end: their endpoint is every point's target."""
    distance: Literal["pseudo_huber", "squared"] = "pseudo_huber"
    """How a point's error is measured. CMT uses LPIPS, whose VGG weights an offline install cannot download;
    orch's default is the pseudo-Huber L2 distance of ECT, its post-training (≈ the L2 norm, the reference code's
    `MAE`), `squared` the per-sample sum of squares (its `MSE`)."""
    huber_c: NonNegativeFloat = 1e-8
    """c of the pseudo-Huber distance."""


def solver_times(m: int, sigma_max: float, sigma_min: float, sigma_data: float) -> list[float]:
    """The M + 1 canonical times of the teacher solver, log-SNR-uniform from σ_max to σ_min (increasing τ)."""
    sigmas = torch.linspace(torch.tensor(sigma_max).log(), torch.tensor(sigma_min).log(), m + 1, dtype=torch.float64)
    return edm_to_canonical(sigmas.exp(), sigma_data).tolist()


@torch.no_grad()
def solve(velocity: Velocity, x: Tensor, taus: list[float]) -> Tensor:
    """DPM-Solver++(2M) with the data prediction x̂1 = x + (1 − τ)·b̂(x, τ) along the canonical path: every state
    from taus[0] to taus[-1], shape (len(taus), *x.shape); one b̂ per step.

    A first-order step from t to s is exact for a constant x̂1: x_s = ((1 − s)/(1 − t))·x_t + (s − t(1 − s)/(1 − t))·x̂1;
    the multistep correction replaces x̂1 by (1 + 1/2r)·x̂1 − (1/2r)·x̂1_prev, r = h_prev/h, h the step in
    log-SNR λ = log(τ/(1 − τ)) (the base's scale cancels from every difference)."""
    states, previous = [x], None
    for t, s in zip(taus[:-1], taus[1:]):
        data = x + (1 - t) * velocity(x, torch.full((len(x),), t, dtype=x.dtype, device=x.device))
        h = (torch.tensor(s / (1 - s)).log() - torch.tensor(t / (1 - t)).log()).item()
        direction = data
        if previous is not None:
            r = previous[1] / h
            direction = (1 + 1 / (2 * r)) * data - 1 / (2 * r) * previous[0]
        x = (1 - s) / (1 - t) * x + (s - t * (1 - s) / (1 - t)) * direction
        states.append(x)
        previous = (data, h)
    return torch.stack(states)


def trajectory_pairs(states: Tensor, taus: list[float]) -> tuple[Tensor, Tensor, Tensor]:
    """(points, their times, targets) from solver states (M + 1, k, ...): each trajectory's M points before its
    end, rows j·M + i of trajectory j, each with the trajectory's end as target. Shapes (k·M, ...), (k·M,)."""
    m, k = states.shape[0] - 1, states.shape[1]
    points = states[:m].transpose(0, 1).reshape(k * m, *states.shape[2:])
    times = torch.tensor(taus[:m], dtype=states.dtype, device=states.device).repeat(k)
    return points, times, states[m].repeat_interleave(m, dim=0)


@register_method("cmt")
class CMTMethod(DistilsTeacher, Method):
    __doc__ = f"""Consistency mid-training: the flow map to data regressed onto the ends of the teacher's
    DPM-Solver++ trajectories from each of their points; the multistep consistency sampler, NFE = N.

    {CMT}
    """

    Params, own_times = CMTParams, True

    def __init__(self, params: CMTParams, setting: Setting):
        super().__init__(params, setting)
        self.interpolant, self.sigma_data = setting.interpolant, setting.sigma_data

    @classmethod
    def train_problems(cls, params: CMTParams, train: dict) -> list[tuple[str, str]]:
        rows = train["batch_size"] // train["micro_batches"]
        if rows % params.nfe:
            message = f"{params.nfe} does not divide the micro-batch of {rows} rows: a batch holds whole trajectories"
            return [("method.nfe", message)]
        return []

    def expected_passes(self, batch: int) -> tuple[float, float]:
        return 1.0 + self.teacher_passes(), 0.0  # M teacher steps on B/M trajectories; the student once

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        p = self.params
        if len(x1) % p.nfe:
            raise ValueError(f"method.nfe {p.nfe} does not divide this worker's {len(x1)} rows")
        taus = solver_times(p.nfe, p.sigma_max, p.sigma_min, self.sigma_data)
        first = slice(None, None, p.nfe)  # trajectory j starts from row j·M, with that row's label
        x0 = self.interpolant.sample_base(len(x1), x1.shape[1:], gen)[first]
        start = self.interpolant.interpolate(x0, x1[first], torch.full((len(x0),), taus[0], device=x1.device))
        with net.condition.rows(first):
            states = solve(self.teacher(), start, taus)
        points, times, targets = trajectory_pairs(states, taus)
        with net.condition.rows(torch.arange(len(x1), device=x1.device) // p.nfe * p.nfe):
            pred = jump(net, points, times, torch.ones_like(times))
        distance = Distance("pseudo_huber", p.huber_c) if p.distance == "pseudo_huber" else L2
        return [Term("cmt", pred, targets, times, torch.ones_like(times), distance=distance)]

    def sample(self, net: nn.Module, x0: Tensor, nfe: int, gen: Gen) -> Tensor:
        tau_min = sigma_max_time(self.params.sigma_max, self.sigma_data)
        return sample_consistency(net, x0, nfe, tau_min, self.interpolant.base_std, gen)
