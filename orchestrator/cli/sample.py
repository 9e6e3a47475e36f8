"""`orch sample`: its options and its handler (the sampling itself: orchestrator/sample.py)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from orch.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    add_submitted_command,
    comma_list,
    eval_request,
    raise_interrupt,
    refuse_options,
    study_dir_of,
)
from orch.problems import Problem


def sample_problems(study_dir: Path, args, request) -> list[Problem]:
    """What is wrong with `orch sample`'s options before anything is built."""
    from orch.eval import request_problems

    problems = request_problems(study_dir, request, [args.trial], {})
    problems += [Problem(f"--{o}", "one value") for o in ("nfe", "guidance") if len(getattr(request, o) or []) > 1]
    if args.seed_range < 0:
        problems.append(Problem("--seed-range", "a seed range is 0 or more"))
    out = Path(args.out)
    if out.exists():
        problems.append(Problem("--out", f"{out} exists: remove it or choose another path"))
    if not out.parent.is_dir():
        problems.append(Problem("--out", f"no such directory: {out.parent}"))
    return problems


def cmd_sample(args) -> int:
    from orch.eval import Unit, Weights
    from orch.execution.trial import Trial
    from orch.methods.data.images import ImageDataset
    from orch.sample import sample_stream, write_samples
    from orch.trial.config import eval_ema

    study_dir = study_dir_of(args.study, args.workdir)
    request = eval_request(argparse.Namespace(**vars(args), metrics=None, seeds=1))
    if problems := sample_problems(study_dir, args, request):
        return refuse_options("sample", problems)
    trial, out = Trial.load(study_dir / "trials" / args.trial), Path(args.out)
    unit = Unit("", request.nfe[0], (request.guidance or [1.0])[0], args.seed_range)  # weights need no metric
    weights = Weights(trial, request.checkpoint, eval_ema(trial.config))
    if why := weights.missing(unit):
        return refuse_options("sample", [Problem("--checkpoint", why)])
    classes = comma_list(args.classes, int, "--class") if args.classes else None
    chunks, labels, dataset = sample_stream(trial, weights, unit, args.num, classes, args.device)
    images = isinstance(dataset, ImageDataset)
    if (out.suffix == ".npy") == images:
        want = "an .npz file or a folder (no suffix)" if images else "an .npy file"
        return refuse_options("sample", [Problem("--out", f"{trial.id}'s samples go to {want}")])
    if classes and (labels is None or max(classes) >= dataset.num_classes or min(classes) < 0):
        known = f"0 … {dataset.num_classes - 1}" if labels is not None else "none: the trial is unconditional"
        return refuse_options("sample", [Problem("--class", f"labels of the trial's classes ({known})")])
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        write_samples(chunks, labels, dataset, args.num, out)
    except KeyboardInterrupt:
        print(f"interrupted: nothing written to {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"{args.num:,} samples of trial {trial.id} ({trial.label}) at NFE {unit.nfe} written to {out}")
    return EXIT_OK


def add_sample(sub) -> None:
    help_text = "write a stored checkpoint's samples for external evaluators"
    s = add_submitted_command(sub, "sample", help_text, cmd_sample)
    s.add_argument("--trial", required=True, help="the trial id (`orch status` lists them)")
    s.add_argument("--checkpoint", default="best", help="best (for the NFE, default), last, or a kept training step")
    s.add_argument("--nfe", required=True, help="network evaluations per sample")
    s.add_argument("--num", type=int, required=True, help="number of samples")
    s.add_argument("--guidance", help="guidance scale ω (default 1: unguided)")
    s.add_argument(
        "--class", dest="classes", help="labels to cycle through, e.g. 3 or 0,1,2 (default: class frequencies)"
    )
    s.add_argument("--seed-range", type=int, default=0, help="which seed range's noise (as orch eval --seeds counts)")
    s.add_argument("--out", required=True, help="PATH.npz (ADM's layout), a folder for PNGs, or PATH.npy for 2-D data")
    s.add_argument("--device", help="cpu or cuda (default: the trial's train.device)")
