"""Reference: what classifier-free guidance does to the exact flow of the gmm dataset (studies/gmm_guidance.yaml's
data), with no learning involved. Samples the guided flow v_∅ + ω·(v_y − v_∅) of the closed-form mixture
velocities with flow matching's Euler sampler through orch's guided evaluation path, and prints kl_cond and kl
per guidance scale and NFE (two-pass: a guided step costs 2 evaluations).

python bench/guidance_exact.py [--samples 16000] [--nfe 4 16 64] [--guidance 1 1.5 2 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orch.methods.catalog import METHODS  # noqa: E402
from orch.methods.contracts.interpolants import LinearInterpolant  # noqa: E402
from orch.methods.contracts.method import Setting  # noqa: E402
from orch.methods.data.toy2d import GaussianMixture, GMMParams  # noqa: E402
from orch.methods.evaluation.generation import EvalConfig, eval_labels, generate  # noqa: E402
from orch.methods.evaluation.metric import metric  # noqa: E402
from tests.gaussian import ExactMixtureVelocity  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16000)
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    args = parser.parse_args()
    data = GaussianMixture(GMMParams(conditional=True))
    exact = ExactMixtureVelocity(data.means, data.scale, data.std.double())
    interpolant = LinearInterpolant(data.std)
    fm = METHODS.get("fm")
    method = fm.build(fm.params(), Setting(interpolant, None, float(data.std.mean()), num_classes=data.num_classes))
    evaluation = EvalConfig(num_samples=args.samples, batch_size=args.samples, nfe=args.nfe)
    labels = eval_labels(data, args.samples, seed=0)
    cpu = torch.device("cpu")
    print("| ω | " + " | ".join(f"NFE {n}: kl_cond / kl" for n in args.nfe) + " |")
    print("|---|" + "---|" * len(args.nfe))
    for omega in args.guidance:
        cells = []
        for nfe in args.nfe:
            x = generate(method, exact, interpolant, data, evaluation, nfe, 0, cpu, omega, labels)
            kl_cond = metric("kl_cond")(x, data, evaluation, cpu, labels)
            cells.append(f"{kl_cond:.3f} / {metric('kl')(x, data, evaluation, cpu):.3f}")
        print(f"| {omega:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
