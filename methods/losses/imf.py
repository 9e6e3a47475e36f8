"""Improved MeanFlow (iMF) (docs/methods.md, "iMF").

MeanFlow's loss rewritten on the instantaneous velocity: V = v_θ(x; a, b) − (b − a)·sg(d/da v_θ) is regressed
onto a target free of the network. Gradient-wise that is MeanFlow with two changes: the JVP's tangent is the
model's own (detached) velocity instead of the conditional one, and classifier-free guidance becomes a network
input — the scale ω is drawn per sample in training and the guided target is built from the model's own
conditional and unconditional velocities, so guidance is chosen at sampling time with one evaluation per step.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, NonNegativeFloat, model_validator
from torch import Tensor

from orch.methods.contracts.counting import CountingNet
from orch.methods.contracts.guidance import drop_labels, in_interval, labels_of, normalised_omega
from orch.methods.contracts.interpolants import expand_time
from orch.methods.contracts.method import Term, register_method
from orch.methods.losses.meanflow import MeanFlow, MeanFlowParams, meanflow_term
from orch.methods.runtime.parallel import Gen, rand


def power_law(u: Tensor, lo: float, hi: float, beta: float) -> Tensor:
    """ω on [lo, hi] with density ∝ ω^(−β), by the inverse CDF of uniforms u (β = 1: log-uniform). Shape of u."""
    if beta == 1.0:
        return lo * (hi / lo) ** u
    e = 1 - beta
    return (lo**e + u * (hi**e - lo**e)) ** (1 / e)


class IMFParams(MeanFlowParams):
    ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    """Fraction of samples with a real jump (the reference: half the batch on the diagonal)."""
    online_cfg: Annotated[list[Annotated[float, Field(ge=1.0, le=100.0)]], Field(min_length=2, max_length=2)] | None = (
        None
    )
    """[ω_lo, ω_hi]: guidance as a network input (class-conditional data; the paper: [1, 8]). Each sample draws
    ω with density ∝ ω^(−omega_power), the network sees it, and the target is the guided velocity
    x1 − x0 + (1 − 1/ω)·(v(y) − v(∅)) from the model's own detached diagonal; sampling at any ω in the range
    then takes one evaluation per step. null: no guidance input (cfg_omega/cfg_kappa guide as in MeanFlow)."""
    online_interval: bool = False
    """Under online_cfg, also make the guidance interval [τ_lo, τ_hi] a network input: each sample draws
    τ_lo ~ U[0, ½] and τ_hi ~ U[½, 1] (the reference's), jumps from the diagonal get [0, 1], and the target is
    guided (ω) only where the start time a lies inside; sampling then takes eval.guidance_interval. false: the
    interval is the fixed option cfg_interval (null: everywhere)."""
    omega_power: NonNegativeFloat = 1.0
    """β of the law of ω (1: log-uniform, the reference's default)."""
    label_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    """Under online_cfg, the fraction of labels the method replaces by the null class (their target is x1 − x0);
    the trainer's train.label_dropout applies otherwise."""

    @model_validator(mode="after")
    def one_guidance(self):
        if self.online_cfg is not None and (self.cfg_omega != 1.0 or self.cfg_kappa != 0.0):
            raise ValueError("online_cfg replaces cfg_omega/cfg_kappa: set one kind of guidance in training")
        if self.online_interval and self.online_cfg is None:
            raise ValueError("online_interval is a guidance input: it needs online_cfg")
        if self.online_interval and self.cfg_interval is not None:
            raise ValueError("online_interval draws the guidance interval: cfg_interval (a fixed one) must be null")
        return self


@register_method("imf")
class IMF(MeanFlow):
    """Improved MeanFlow: MeanFlow's target with the model's own velocity as the JVP tangent and guidance as a
    network input (online_cfg), the adaptive weight on the summed squared error; the uniform N-step flow-map
    sampler, one evaluation per step at any guidance scale of the trained range.

    This is the reference's variant without the auxiliary velocity head (the tangent is the model's own
    diagonal v_θ(x; a, a)); the guidance interval is an input with online_interval, else a fixed cfg_interval.

    Z. Geng, Y. Lu, Z. Wu, E. Shechtman, J. Z. Kolter, K. He, "Improved Mean Flows: On the Challenges of
    Fastforward Generative Models", 2025, arXiv:2512.02012.
    """

    Params = IMFParams

    def expected_passes(self, batch: int) -> tuple[float, float]:
        """The student's forward and the target's JVP; the diagonal tangent's forward, or under guidance the
        batched conditional + unconditional diagonal (MeanFlow-style guidance adds that pass too)."""
        if self.setting.num_classes is not None and self.embedded_guidance is not None:
            return 3.0, 1.0
        return 2.0 + 2 * self.guides_in_training(), 1.0

    def terms(self, net: CountingNet, x1: Tensor, step: int, gen: Gen) -> list[Term]:
        x_a, a, b, velocity = self.jumps(x1, step, gen)
        if self.embedded_guidance is None or labels_of(net) is None:
            velocity = self.guided_velocity(net, x_a, a, velocity)
            with torch.no_grad():
                tangent = net(x_a, a, a)
        else:
            velocity, tangent = self.embedded_target(net, x_a, a, b, velocity, gen)
        term = meanflow_term(net, x_a, a, b, velocity, self.distance, tangent)
        term.name = "imf"
        return [term]

    def embedded_target(self, net: CountingNet, x: Tensor, a: Tensor, b: Tensor, velocity: Tensor, gen: Gen):
        """Guidance as an input: draw ω (and the interval) and drop labels, setting them as the network's inputs
        for this batch, then (v_g, ĝ_c): v_g = İ + (1 − 1/ω')(ĝ_c − ĝ_u) (İ for dropped labels), where ω' = ω
        inside the guidance interval and 1 outside, ĝ_c = v(x; a, a, y, ω') and ĝ_u = v(x; a, a, ∅, 1) from one
        batched pass, both over the whole interval [0, 1]. Shapes: x, velocity (n, ...); a, b (n,)."""
        p, condition, num_classes = self.params, net.condition, self.setting.num_classes
        lo, hi = self.embedded_guidance
        omega = power_law(rand(gen, len(x)), lo, hi, p.omega_power)
        everywhere = torch.tensor([0.0, 1.0], device=x.device).expand(len(x), 2)
        if p.online_interval:
            drawn = torch.stack([rand(gen, len(x)) / 2, 0.5 + rand(gen, len(x)) / 2], dim=1)
            interval = torch.where((a == b)[:, None], everywhere, drawn)
            inside = (a >= interval[:, 0]) & (a <= interval[:, 1])
            condition.interval = interval
        else:
            inside = in_interval(a, p.cfg_interval)
        effective = torch.where(inside, omega, torch.ones_like(omega))
        labels = drop_labels(condition.labels, p.label_dropout, num_classes, gen)
        # the network's input is the drawn ω when the interval is an input too, else the effective one
        condition.labels, condition.omega = (
            labels,
            normalised_omega(omega if p.online_interval else effective, (lo, hi)),
        )
        null = torch.full_like(labels, num_classes)
        estimate = normalised_omega(torch.cat([effective, torch.ones_like(effective)]), (lo, hi))
        whole = torch.cat([everywhere, everywhere]) if p.online_interval else None
        with torch.no_grad(), condition.using(torch.cat([labels, null]), estimate, whole):
            g_cond, g_null = net(torch.cat([x, x]), a.repeat(2), a.repeat(2)).chunk(2)
        guided = velocity + expand_time(1 - 1 / effective, x) * (g_cond - g_null)
        return torch.where(expand_time(labels == num_classes, x), velocity, guided), g_cond
