"""Benchmark: the JVP back-ends' training-step cost on a DiT, relative to flow matching's step.

For each sequence length (DiT patches on 32 × 32 images: 16, 64 and 256 tokens), flow matching's step and, for
each JVP method (MeanFlow, sCT, LSD), one step per back-end: exact JVP with explicit-softmax attention (`math`),
exact JVP with fused attention and orch's forward-mode rule (`sdpa`), finite differences with fused attention.
Each row runs in a fresh process (bench/method_cost.py's measurement: median step time after warm-up; peak
memory above the process's memory before the first step, CUDA max allocated on a GPU). Prints time and memory as
ratios to FM at the same length, and the two ratios the back-ends are judged by at the longest sequence: finite
differences' memory over the math path's, and the forward-mode rule's time over the math path's.

python bench/jvp_cost.py --depth 2 --hidden 128 --heads 4      # a small DiT on this CPU
python bench/jvp_cost.py --size B --batch 64 --device cuda --tokens 256 --jvp-kernel   # DiT-B/2 on a GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.image_cost import synthetic_cifar  # noqa: E402
from bench.method_cost import measure_config  # noqa: E402

PATCHES = {16: 8, 64: 4, 256: 2}
"""Tokens of a 32 × 32 image: the DiT patch that gives them."""
BACK_ENDS = {
    "exact·math": ("exact", "math"),
    "exact·sdpa": ("exact", "sdpa"),
    "fd·sdpa": ("finite_difference", "sdpa"),
}
"""Back-end: (train.jvp.mode, model.attention)."""
METHODS = ["meanflow", "sct", "lsd"]


def trial_config(method: str, back_end: str, tokens: int, args: argparse.Namespace, root: str) -> dict:
    mode, attention = BACK_ENDS[back_end]
    shape = {k: v for k, v in (("depth", args.depth), ("hidden", args.hidden), ("heads", args.heads)) if v}
    model = {"name": "dit", "size": args.size, "patch": PATCHES[tokens], **shape}
    return {
        "dataset": {"name": "cifar10", "root": root},
        "method": {"name": method},
        "model": model | {"attention": attention},
        "train": {"batch_size": args.batch, "device": args.device, "ema": [0.999], "jvp": {"mode": mode}},
        "eval": {"metrics": ["fid"]},
    }


def run_one(config: dict, args: argparse.Namespace) -> dict:
    """measure_config of `config` in a fresh process."""
    out = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(config), "--steps", str(args.steps), "--device", args.device],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="S", choices=["S", "B", "L", "XL"], help="DiT size")
    parser.add_argument("--depth", type=int, help="override the size's blocks")
    parser.add_argument("--hidden", type=int, help="override the size's width")
    parser.add_argument("--heads", type=int, help="override the size's heads")
    parser.add_argument("--jvp-kernel", action="store_true", help="also the fused JVP kernel (CUDA, orch[gpu])")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(PATCHES), choices=list(PATCHES))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one trial config (JSON)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_config(json.loads(args.one), args.steps, args.device)))
        return
    if args.jvp_kernel:
        BACK_ENDS["exact·kernel"] = ("exact", "jvp_kernel")
    with tempfile.TemporaryDirectory() as root:
        synthetic_cifar(Path(root), per_batch=1000)
        shape = "".join(
            f", {k} {v}" for k, v in (("depth", args.depth), ("width", args.hidden), ("heads", args.heads)) if v
        )
        print(f"DiT-{args.size}{shape}, batch {args.batch}, {args.device}, median of {args.steps} steps; time and "
              "memory relative to flow matching at the same length")  # fmt: skip
        print(f"{'tokens':>6} {'method':9} {'back-end':11} {'ms/step':>8} {'time×FM':>8} {'mem MB':>8} {'mem×FM':>7}"
              f" {'fwd':>5} {'jvp':>5}")  # fmt: skip
        rows = {}
        for tokens in args.tokens:
            fm = run_one(trial_config("fm", "exact·sdpa", tokens, args, root), args)
            for method in ["fm", *METHODS]:
                for back_end in ["exact·sdpa"] if method == "fm" else BACK_ENDS:
                    if back_end == "exact·kernel" and method == "lsd":
                        continue  # LSD back-propagates through its JVP: the kernel cannot serve it
                    row = fm if method == "fm" else run_one(trial_config(method, back_end, tokens, args, root), args)
                    rows[tokens, method, back_end] = row
                    print(
                        f"{tokens:6d} {method:9} {back_end:11} {1000 * row['step_s']:8.1f} "
                        f"{row['step_s'] / fm['step_s']:8.2f} {row['mem_mb']:8.1f} {row['mem_mb'] / fm['mem_mb']:7.2f} "
                        f"{row['fwd']:5.2f} {row['jvp']:5.2f}"
                    )
    longest = max(args.tokens)
    for method in METHODS:
        math_row = rows[longest, method, "exact·math"]
        memory = rows[longest, method, "fd·sdpa"]["mem_mb"] / math_row["mem_mb"]
        time = rows[longest, method, "exact·sdpa"]["step_s"] / math_row["step_s"]
        print(f"{method} at {longest} tokens: finite-difference memory / math path {memory:.2f} (target ≤ 0.6); "
              f"forward-mode rule time / math path {time:.2f} (target ≤ 1.1)")  # fmt: skip


if __name__ == "__main__":
    main()
