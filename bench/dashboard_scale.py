"""Benchmark: build the dashboard of a synthetic 1,000-trial study; prints time and peak memory.

python bench/dashboard_scale.py [--trials 1000]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.synthetic_study import synthetic_study  # noqa: E402
from orch.dashboards.report import build_dashboard  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        study_dir = Path(tmp)
        start = time.perf_counter()
        uri = synthetic_study(study_dir, args.trials)
        written = time.perf_counter() - start
        start = time.perf_counter()
        page = build_dashboard(uri, "synthetic", study_dir / "dashboard.html")
        built = time.perf_counter() - start
        size = page.stat().st_size / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"trials: {args.trials}  store written in {written:.1f} s  dashboard built in {built:.1f} s  "
        f"({size:.1f} MB page, process peak RSS {peak:.0f} MB)"
    )


if __name__ == "__main__":
    main()
