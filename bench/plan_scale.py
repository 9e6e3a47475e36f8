"""Benchmark: planning a 10,000-trial grid (load, validate every trial through the registries, hash ids).

python bench/plan_scale.py [--trials 10000]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orch.study.load import parse_study  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=10000)
    args = parser.parse_args()
    seeds = max(1, args.trials // (4 * 5 * 5 * 2))
    text = yaml.safe_dump(
        {
            "name": "plan_scale",
            "base": {"train": {"steps": 1000}},
            "grid": {
                "method.name": ["lsd", "esd", "psd_mid", "psd_unif"],
                "method.diag_fraction": [0.5, 0.6, 0.7, 0.75, 0.9],
                "train.lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
                "train.batch_size": [256, 512],
                "train.seed": list(range(seeds)),
            },
        }
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    study = parse_study(text, "plan_scale.yaml")
    seconds = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"planned {len(study.trials)} trials in {seconds:.2f} s ({1e6 * seconds / len(study.trials):.0f} µs per "
        f"trial); peak RSS grew by {(rss_after - rss_before) / 1024:.0f} MB"
    )


if __name__ == "__main__":
    main()
