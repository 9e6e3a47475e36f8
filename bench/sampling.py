"""Benchmark: sampling throughput of the flow-map sampler at 1, 2 and 4 steps (samples per second), and of the
KL evaluation, on the checker MLP.

python bench/sampling.py [--width 512] [--depth 5] [--samples 64000] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orch.methods.contracts.flow_map import sample_flow_map  # noqa: E402
from orch.methods.data.toy2d import Checkerboard  # noqa: E402
from orch.methods.evaluation.metric import METRICS  # noqa: E402
from orch.methods.networks.mlp import FlowMapMLP  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--samples", type=int, default=64000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = Checkerboard()
    net = FlowMapMLP(2, args.width, args.depth, data.std).to(device).eval()
    x0 = torch.randn(args.samples, 2, device=device) * data.std.to(device)
    print(f"checker MLP {args.width}x{args.depth}, {args.samples} samples, {args.device}, {args.threads} thread(s)")
    for steps in (1, 2, 4):
        seconds = best_of(lambda s=steps: sample_flow_map(net, x0, s))
        print(f"{steps}-step sampling: {args.samples / seconds:12,.0f} samples/s")
    samples = sample_flow_map(net, x0, 1).cpu()
    kl = METRICS.get("kl").build
    seconds = best_of(lambda: kl(samples, data))
    print(f"KL on a 50x50 histogram: {args.samples / seconds:12,.0f} samples/s")


if __name__ == "__main__":
    main()
