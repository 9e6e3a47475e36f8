"""`orch`: validate, plan, submit, status and dashboard for study files (docs/contracts.md lists the commands,
their options and exit codes)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import signal
import sys
from pathlib import Path

import yaml

from orchestrator.preflight import tracking_problems, workdir_problems
from orchestrator.study.problems import Problem

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


def load_or_exit(args):
    """The study of a command's STUDY, --profile and KEY=VALUE overrides, or exit 2 listing every problem."""
    from orchestrator.study.load import load_study
    from orchestrator.study.problems import StudyError

    try:
        return load_study(args.study, args.profile, parse_overrides(args.overrides))
    except StudyError as e:
        print(e.report(), file=sys.stderr)
        raise SystemExit(EXIT_INVALID) from None


def parse_overrides(pairs: list[str]) -> dict:
    """KEY=VALUE arguments as dotted key → value, each value read as YAML (`lr=1e-3`, `'method.name=[lsd,esd]'`).
    Raises StudyError naming a malformed one."""
    from orchestrator.study.problems import StudyError
    from orchestrator.study.yaml_source import YAMLLimit, check_limits, parse

    overrides, problems = {}, []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
            problems.append(Problem(pair, "an override is KEY=VALUE with a dotted KEY, e.g. train.lr=1e-3"))
            continue
        try:
            check_limits(text)
            overrides[key] = parse(text)
        except (YAMLLimit, yaml.YAMLError) as e:
            problems.append(Problem(pair, f"the value is not YAML ({type(e).__name__})"))
    if problems:
        raise StudyError("the command line", problems)
    return overrides


def cmd_validate(args) -> int:
    study = load_or_exit(args)
    print(
        f"{args.study}: valid study {study.name!r}, {len(study.trials)} trial(s)"
        + (f" with profile {study.profile!r}" if study.profile else "")
    )
    return EXIT_OK


def print_plan(study) -> None:
    from orchestrator.study.expand import show_factor

    print(
        f"study {study.name!r}"
        + (f" (profile {study.profile})" if study.profile else "")
        + f": {len(study.trials)} trial(s)"
    )
    axes = study.axes
    rows = [[show_factor(t.factors.get(a)) for a in axes] for t in study.trials]
    widths = [max(len(a), *(len(row[i]) for row in rows)) for i, a in enumerate(axes)]
    print("  " + "trial_id".ljust(14) + "  ".join(a.ljust(w) for a, w in zip(axes, widths)))
    for t, row in zip(study.trials, rows):
        print("  " + t.id.ljust(14) + "  ".join(v.ljust(w) for v, w in zip(row, widths)))
    if study.teachers:
        print(f"{len(study.teachers)} teacher trial(s), trained first (once per work directory):")
        for teacher in study.teachers:
            students = sum(t.teacher == teacher.id for t in study.trials)
            train = teacher.config["train"]
            print(f"  {teacher.id.ljust(14)}flow matching, {train['steps']} steps, for {students} trial(s)")


def cmd_plan(args) -> int:
    print_plan(load_or_exit(args))
    return EXIT_OK


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


RAY_OPTIONS = {"ray_address": "address", "max_concurrent": "max_concurrent"}
"""submit's options that set the ray backend's options (option attribute → backend key)."""


def given_options(args) -> list[str]:
    return [option for option in RAY_OPTIONS if getattr(args, option) is not None]


def submitted_backend(study, args):
    """The backend options of a submission: the study's backend section, switched to --backend if given (the
    file's options then apply only when they are that backend's), with --ray-address / --max-concurrent on top.
    Returns (params, problems)."""
    from orchestrator.backends import backend_params, search_refused, workers_refused

    raw = study.backend.model_dump()
    if args.backend is not None and args.backend != raw["name"]:
        raw = {"name": args.backend}
    given = {RAY_OPTIONS[option]: getattr(args, option) for option in given_options(args)}
    if given and raw["name"] != "ray":
        flags = ", ".join("--" + option.replace("_", "-") for option in given_options(args))
        return None, [Problem(flags, f"applies to the ray backend; this submission's backend is {raw['name']!r}")]
    params, problems = backend_params(raw | given)
    if params is not None and study.search is not None:
        problems += search_refused(params, "--backend" if args.backend else "backend.name")
    if params is not None:
        problems += workers_refused(params, [t.config for t in [*study.teachers, *study.trials]], "train")
    return params, problems


def cmd_submit(args) -> int:
    from orchestrator.backends import backend_of

    study = load_or_exit(args)
    params, problems = submitted_backend(study, args)
    if problems:
        return refuse(args.study, problems)
    if args.dry_run:
        print_plan(study)
        print(f"(dry run: backend {params.name}, nothing started)")
        return EXIT_OK
    workdir = Path(args.workdir)
    problems = workdir_problems(workdir) + tracking_problems(args.tracking_uri)
    problems += backend_of(params).preflight(from_cli=args.ray_address is not None)
    if problems:
        return refuse(args.study, problems)
    return run_submission(study, params, workdir, args.tracking_uri)


def refuse(source: str, problems: list) -> int:
    """Report problems found before anything was created: exit 2."""
    from orchestrator.study.problems import StudyError

    print(StudyError(source, problems).report(), file=sys.stderr)
    return EXIT_INVALID


def study_dir_of(target: str, workdir: str) -> Path:
    """A submitted study given by its file (its `name`) or by name; a name obeys the study files' rule, so that
    it never leaves the work directory."""
    from orchestrator.study.load import load_study
    from orchestrator.study.problems import StudyError
    from orchestrator.study.schema import STUDY_NAME

    name = target
    if target.endswith((".yaml", ".yml")) and Path(target).is_file():
        try:
            name = load_study(target).name
        except StudyError as e:
            print(e.report(), file=sys.stderr)
            raise SystemExit(EXIT_INVALID) from None
    if not re.fullmatch(STUDY_NAME, name):
        print(f"error: {name!r} is not a study name (letters, digits, _ . -; no paths)", file=sys.stderr)
        raise SystemExit(EXIT_INVALID)
    path = Path(workdir) / name
    if not (path / "trials").is_dir():
        where = f"{Path(workdir).resolve()}/" + (
            f" (${WORKDIR_ENV})" if os.environ.get(WORKDIR_ENV) == workdir else " (--workdir; default ./runs)"
        )
        print(f"error: no submitted study {name!r} under {where}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID)
    return path


def job_states(backend, rows: list[dict]) -> dict[str, str]:
    """Live states of the rows' jobs from the study's backend, or {} with a warning when it cannot be asked."""
    from orchestrator.backends import BackendError

    ids = [row["job_id"] for row in rows if row["job_id"]]
    if backend is None or not ids:
        return {}
    try:
        return backend.job_states(ids)
    except BackendError as e:
        print(f"warning: no {backend.params.name} job states: {e}", file=sys.stderr)
        return {}


def cmd_status(args) -> int:
    from orchestrator.driver import backend_of_submission, study_status
    from orchestrator.lock import live_driver, recorded_driver
    from orchestrator.tracking.schema import RUNNING
    from orchestrator.trial.state import read_json

    study_dir = study_dir_of(args.study, args.workdir)
    current = read_json(study_dir / "submission.json").get("generation")
    rows = study_status(study_dir)
    shown = [r for r in rows if args.all or current is None or r["generation"] in (current, "")]  # "": unknown
    backend = backend_of_submission(study_dir)
    states = job_states(backend, shown)
    driven = live_driver(recorded_driver(study_dir)) is not None
    for row in shown:
        job_id = row["job_id"] if backend is not None else None
        live = job_id is not None and states.get(job_id) in backend.live_job_states
        job = f"  [{backend.params.name} {job_id} {states.get(job_id, 'gone')}]" if job_id else ""
        note = row["reason"].strip().splitlines()[-1] if row["reason"] else ""
        if row["status"] == RUNNING and not driven and not live:
            note = "no live orch process runs it: `orch resume` continues it from its checkpoint"
        older = "  [earlier version of the study]" if row["generation"] not in (current, "") else ""
        print(
            f"{row['id']}  {row['status']:<10} step {row['step']:>7}  {row['label']}{job}{older}"
            + (f"  ({note})" if note else "")
        )
    counts = {}
    for row in shown:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials")
    if hidden := len(rows) - len(shown):
        print(
            f"{hidden} trial(s) of earlier versions of the study not shown: `orch status {study_dir.name} --all` lists "
            f"them, `orch prune {study_dir.name}` archives them"
        )
    return EXIT_OK


def cmd_prune(args) -> int:
    from orchestrator.driver import prune_study
    from orchestrator.lock import StudyBusy

    study_dir = study_dir_of(args.study, args.workdir)
    try:
        archived = prune_study(study_dir, args.dry_run)
    except StudyBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    verb = "would archive" if args.dry_run else "archived"
    print(
        f"{verb} {len(archived)} trial(s) of earlier versions of the study"
        + (f" into {study_dir / 'archive'}" if archived and not args.dry_run else "")
    )
    for trial_id in archived:
        print(f"  {trial_id}")
    return EXIT_OK


def run_submission(study, params, workdir: Path, tracking_uri: str | None) -> int:
    """Submit with the CLI's signal handling and exit codes (shared by submit and resume)."""
    from orchestrator.driver import submit_study
    from orchestrator.lock import StudyBusy
    from orchestrator.study.problems import StudyError
    from orchestrator.tracking.store import TRACKING_ERRORS
    from orchestrator.trial.build import check_data

    if problems := check_data([t.config for t in study.trials]):
        print(StudyError(study.name, problems).report(), file=sys.stderr)
        return EXIT_INVALID
    signal.signal(signal.SIGTERM, raise_interrupt)  # SIGTERM (what Slurm and `orch cancel` send) as Ctrl-C
    try:
        return submit_study(study, params, workdir, tracking_uri)
    except StudyBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except TRACKING_ERRORS as e:  # the store failed before any trial ran (or while recording the end)
        print(f"error: the tracking store failed: {type(e).__name__}: {first_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(
            f"interrupted: finished trials are kept; `orch resume {study.name}` (or submitting the study again)"
            " continues the rest from their checkpoints",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def cmd_resume(args) -> int:
    from orchestrator.backends import backend_of
    from orchestrator.driver import load_submitted
    from orchestrator.study.problems import StudyError

    study_dir = study_dir_of(args.study, args.workdir)
    try:
        study, params, uri = load_submitted(study_dir)
    except StudyError as e:
        print(e.report(), file=sys.stderr)
        return EXIT_INVALID
    if problems := tracking_problems(uri) + backend_of(params).preflight(from_cli=False):
        return refuse(str(study_dir / "study.yaml"), problems)
    profile = f"profile {study.profile}" if study.profile else "the default profile"
    print(f"resuming study {study.name!r} as last submitted (backend {params.name}, {profile})")
    return run_submission(study, params, study_dir.parent, uri)


def cmd_cancel(args) -> int:
    from orchestrator.driver import cancel_study

    study_dir = study_dir_of(args.study, args.workdir)
    n = cancel_study(study_dir)
    print(f"{n} trial(s) cancelled; checkpoints kept (`orch resume {study_dir.name}` continues them)")
    return EXIT_OK


def cmd_dashboard(args) -> int:
    from dashboards.report import build_dashboard
    from orchestrator.driver import tracking_uri_of

    study_dir = study_dir_of(args.study, args.workdir)
    uri = args.tracking_uri or tracking_uri_of(study_dir)
    if args.serve:
        from orchestrator.serve import serve_dashboard

        return serve_dashboard(uri, study_dir, args.port, args.interval)
    try:
        print(build_dashboard(uri, study_dir.name, study_dir / "dashboard.html"))
    except LookupError as e:  # no such experiment in that store
        print(f"error: {e.args[0]}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as e:
        print(f"error: cannot write the dashboard: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_ui(args) -> int:
    from orchestrator.driver import tracking_uri_of
    from orchestrator.serve import serve_mlflow_ui

    if args.study is None:
        studies = sorted(p.parent.name for p in Path(args.workdir).glob("*/trials"))
        if len(studies) != 1:
            found = ", ".join(studies) or "none"
            print(f"error: name the study to browse (studies under {args.workdir}/: {found})", file=sys.stderr)
            return EXIT_INVALID
        args.study = studies[0]
    study_dir = study_dir_of(args.study, args.workdir)
    return serve_mlflow_ui(tracking_uri_of(study_dir), args.study, args.port, study_dir / "mlflow-ui.log")


def fid_input(spec: str):
    """`dataset:split` (a registered image dataset) or an image folder."""
    from methods.catalog import DATASETS
    from orchestrator.trial.build import build_section

    name, _, split = spec.partition(":")
    if name in DATASETS and "images" in DATASETS.get(name).provides:
        return build_section({"dataset": {"name": name, "split": split or "train"}}, "dataset")
    if Path(spec).is_dir():  # at the native size of its first image (Inception resizes to 299 anyway)
        from PIL import Image

        from methods.images import list_images

        with Image.open(list_images(Path(spec))[0]) as first:
            side = min(first.size)
        folder = {"name": "image_folder", "root": spec, "crop": None, "resolution": side}
        return build_section({"dataset": folder}, "dataset")
    raise ValueError(f"{spec!r} is neither an image dataset (dataset:split) nor a directory")


def cmd_fid(args) -> int:
    import torch

    from methods import fid
    from methods.images import DatasetFilesError

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.num is not None and args.num < 2:
        print("error: --num must be at least 2", file=sys.stderr)
        return EXIT_INVALID
    try:
        datasets = [fid_input(args.a), fid_input(args.b)]
    except (ValueError, DatasetFilesError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    try:
        fid.inception_weights()
    except fid.FIDUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    feats = []
    for data in datasets:
        print(f"{data.identity['name']}: {min(args.num or len(data), len(data))} of {len(data)} images", flush=True)
        feats.append(fid.reference_features(data, args.num, device)[0])
    scores, n = fid.fid_kid(*feats), min(len(f) for f in feats)
    spread = f" ± {scores['kid_std']:.5f}" if n > fid.KID_SUBSET else ""
    print(f"FID {scores['fid']:.3f}  KID {scores['kid']:.5f}{spread}  ({fid.EXTRACTOR})")
    if n <= fid.KID_SUBSET:
        print(f"note: KID has no ± from {n} images a side: each of its {fid.KID_SUBSET}-image subsets is the whole set")
    if n < FULL_RANK:
        print(f"note: FID from {n} < {FULL_RANK:,} images a side is biased upwards (rank-deficient covariance)")
    return EXIT_OK


def cmd_encode(args) -> int:
    import torch

    from methods.latents import encode, open_source

    for option in ("resolution", "batch", "shard_size"):
        if getattr(args, option) < 1:
            print(f"error: --{option.replace('_', '-')} must be at least 1", file=sys.stderr)
            return EXIT_INVALID
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        source = open_source(args.source, args.resolution)
        manifest = encode(
            source, args.vae, Path(args.out), resolution=args.resolution, batch=args.batch, device=device,
            hflip=args.hflip, posterior=args.posterior, shard_size=args.shard_size, say=lambda m: print(m, flush=True),
        )  # fmt: skip
    except ValueError as e:  # missing or unreadable inputs, a VAE that cannot be loaded, another encoding in --out
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print(f"interrupted: the finished shards in {args.out} are kept; the same command continues", file=sys.stderr)
        return EXIT_INTERRUPTED
    shape = "×".join(map(str, manifest["latent_shape"]))
    print(f"{manifest['count']:,} latents ({shape}) in {args.out}; train on them with dataset: {{name: latents, "
          f"root: {args.out}}}")  # fmt: skip
    return EXIT_OK


def cmd_vae(args) -> int:
    from methods.latents import open_source, train_small_vae

    for option in ("resolution", "steps", "batch", "limit"):
        if (getattr(args, option) or 1) < 1:
            print(f"error: --{option} must be at least 1", file=sys.stderr)
            return EXIT_INVALID
    if Path(args.out).exists():
        print(f"error: {args.out} exists; choose a new directory for the VAE", file=sys.stderr)
        return EXIT_INVALID
    try:
        source = open_source(args.source, args.resolution)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    if args.limit is not None:
        source.count = min(source.count, args.limit)
    mse = train_small_vae(
        source, Path(args.out), steps=args.steps, batch=args.batch, say=lambda m: print(m, flush=True)
    )
    print(f"a small VAE (reconstruction MSE {mse:.4f}) in {args.out}: orch encode … --vae {args.out}")
    return EXIT_OK


def comma_list(text: str, kind: type, option: str) -> list:
    """`1,2,4` → [1, 2, 4]; exits 2 naming the option when an item is not a `kind`."""
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        print(f"error: {option} {text!r}: a comma-separated list of {kind.__name__} values", file=sys.stderr)
        raise SystemExit(EXIT_INVALID) from None


def where_of(pairs: list[str]) -> dict:
    """--where KEY=VALUE pairs as {dotted key: YAML value}; exits 2 on a malformed one."""
    from orchestrator.study.problems import StudyError

    try:
        return parse_overrides(pairs)
    except StudyError as e:
        print(e.report().replace("an override is", "--where is"), file=sys.stderr)
        raise SystemExit(EXIT_INVALID) from None


def eval_request(args):
    from orchestrator.final import Request

    metrics = None
    if args.metrics is not None:  # prc = precision and recall, as torch-fidelity names the pair
        names = comma_list(args.metrics, str, "--metrics")
        metrics = [m for name in names for m in (["precision", "recall"] if name == "prc" else [name])]
    return Request(
        checkpoint=args.checkpoint,
        nfe=comma_list(args.nfe, int, "--nfe") if args.nfe else None,
        num=args.num,
        metrics=metrics,
        guidance=comma_list(args.guidance, float, "--guidance") if args.guidance else None,
        seeds=args.seeds,
        device=args.device,
    )


OPTION_OF = {
    "eval.metrics": "--metrics",
    "eval.nfe": "--nfe",
    "eval.num_samples": "--num",
    "eval.guidance": "--guidance",
}
"""Where a post-hoc command's option lands in a trial's eval section."""


def refuse_options(command: str, problems: list) -> int:
    """Report problems with a post-hoc command's options, one line each, under the option's name: exit 2."""
    for p in problems:
        option = next((o for key, o in OPTION_OF.items() if p.path == key or p.path.startswith(key + ".")), p.path)
        print(f"error: orch {command}: {option}: {p.message}", file=sys.stderr)
    return EXIT_INVALID


def eval_backend(study_dir: Path, name: str):
    """(backend, problems) for `orch eval --backend NAME`: the study's own backend options when it was submitted to
    that backend, else the backend's defaults."""
    from orchestrator.backends import backend_of, backend_params
    from orchestrator.driver import backend_of_submission

    submitted = backend_of_submission(study_dir)
    if submitted is not None and submitted.params.name == name:
        backend = submitted
    else:
        params, problems = backend_params({"name": name}, "--backend")
        if problems:
            return None, problems
        backend = backend_of(params)
    return backend, backend.preflight(from_cli=False)


def cmd_eval(args) -> int:
    from orchestrator.backends import BackendError
    from orchestrator.final import evaluate_dir, request_problems, select_trials
    from orchestrator.trial.build import inception_problems

    study_dir = study_dir_of(args.study, args.workdir)
    request, where = eval_request(args), where_of(args.where)
    if problems := request_problems(study_dir, request, args.trials, where):
        return refuse_options("eval", problems)
    trials, notes = select_trials(study_dir, args.trials, where)
    metrics = set(request.metrics or [m for t in trials for m in t.config["eval"]["metrics"]])
    if problems := inception_problems(metrics, "--metrics"):
        return refuse_options("eval", problems)
    for note in notes:
        print(f"note: {note}")
    if not trials:
        print("error: no trial matches: nothing to evaluate", file=sys.stderr)
        return EXIT_INVALID
    backend, problems = eval_backend(study_dir, args.backend)
    if problems:
        return refuse_options("eval", problems)
    signal.signal(signal.SIGTERM, raise_interrupt)
    here = backend.params.name == "local"  # in this process: its lines are printed as they come
    task = functools.partial(evaluate_dir, request=request, say=print if here else None)
    try:
        results = backend.map(task, [t.dir for t in trials], study_dir, study_dir.name)
    except KeyboardInterrupt:
        print("interrupted: finished evaluations are kept; the same command finishes the rest", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BackendError as e:  # e.g. a Slurm job that died without a result: done evaluations are kept
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    for _, _, lines in results if not here else []:
        print("\n".join(lines))
    computed, lacking = sum(r[0] for r in results), sum(r[1] for r in results)
    done_before = "" if computed else " (every evaluation was done already)"
    print(f"{computed} evaluation(s) computed for {len(trials)} trial(s){done_before}; logged as final/<metric>/…")
    return EXIT_FAILED if lacking else EXIT_OK  # some evaluation lacked weights or failed


def sample_problems(study_dir: Path, args, request) -> list[Problem]:
    """What is wrong with `orch sample`'s options before anything is built."""
    from orchestrator.final import request_problems

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
    from methods.images import ImageDataset
    from orchestrator.export import sample_stream, write_samples
    from orchestrator.final import Unit, Weights
    from orchestrator.trial.config import eval_ema
    from orchestrator.trial.runner import Trial

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


def cmd_table(args) -> int:
    from dashboards.report import direction_of, study_frames, study_groups
    from dashboards.tables import final_values, paper_table, render
    from orchestrator.driver import tracking_uri_of

    study_dir = study_dir_of(args.study, args.workdir)
    if args.digits < 0 or args.digits > 12:
        print("error: orch table: --digits: 0 to 12 decimals", file=sys.stderr)
        return EXIT_INVALID
    try:
        runs, _, parent_tags, _ = study_frames(args.tracking_uri or tracking_uri_of(study_dir), study_dir.name)
    except LookupError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return EXIT_INVALID
    group_cols, _ = study_groups(runs, parent_tags)
    metrics = sorted({str(c).split("/")[1] for c in runs.columns if str(c).startswith(f"{args.source}/")})
    metric = args.metric or (metrics[0] if metrics else None)
    if metric not in metrics:
        found = ", ".join(metrics) or "none"
        print(
            f"error: no {args.source}/ values of {metric!r} in study {study_dir.name} (metrics: {found})",
            file=sys.stderr,
        )
        return EXIT_INVALID
    if args.source == "final":  # only the values measured under one protocol, and the others said
        runs, _, notes = final_values(runs, metric)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    table = paper_table(runs, metric, group_cols, direction_of(runs, metric), args.source, args.guidance, args.spread)
    if table.empty:
        print(f"error: no completed trial has {args.source}/{metric} values at ω = {args.guidance:g}", file=sys.stderr)
        return EXIT_INVALID
    print(render(table, metric, args.format, args.digits), end="")
    return EXIT_OK


def cmd_describe(args) -> int:
    from orchestrator.study.describe import UnknownSection, describe

    try:
        print(describe(args.target), end="")
    except UnknownSection as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


FULL_RANK = 2048
"""Images per side below which the 2048-d Inception covariance of FID is rank-deficient."""


WORKDIR_ENV = "ORCH_WORKDIR"


def default_workdir() -> str:
    return os.environ.get(WORKDIR_ENV) or "runs"


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    from orchestrator.tracking.store import git_commit

    try:
        number = package_version("orch")
    except PackageNotFoundError:
        number = "(not installed)"
    return f"orch {number} (commit {git_commit()})"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orch", description="Run and compare few-step generative-model studies.")
    p.add_argument("--version", action="version", version=version(), help="print orch's version and commit")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines: only the summary and errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    workdir_help = f"where studies live (default: ${WORKDIR_ENV}, else ./runs)"

    def study_cmd(name: str, help_text: str, func):
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("study", help="study YAML file")
        s.add_argument(
            "overrides",
            nargs="*",
            metavar="KEY=VALUE",
            help="dotted overrides of the study, values in YAML: train.lr=1e-3 sets a value; a list "
            "('method.name=[lsd,esd]') makes or replaces a grid axis; applied after --profile",
        )
        s.add_argument("--profile", help="a named override set from the study's `profiles`")
        s.set_defaults(func=func)
        return s

    study_cmd("validate", "check a study file; exit 2 listing every problem", cmd_validate)
    study_cmd("plan", "print the expanded trials; nothing runs", cmd_plan)
    s = study_cmd("submit", "run every trial of a study (finished trials are skipped)", cmd_submit)
    s.add_argument("--backend", help="where trials run: ray, local, slurm or an installed one (default: the study's)")
    s.add_argument("--workdir", default=default_workdir(), help=workdir_help)
    s.add_argument("--ray-address", help="an existing Ray cluster, HOST:PORT or ray://HOST:PORT (default: embedded)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<workdir>/<study>/mlflow.db)")
    s.add_argument("--max-concurrent", type=int, help="trials at once on Ray (default: the study's backend)")
    s.add_argument("--dry-run", action="store_true", help="validate and print the plan only; nothing is created")

    def submitted_cmd(name: str, help_text: str, func):
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("study", help="study name or study YAML file")
        s.add_argument("--workdir", default=default_workdir(), help=workdir_help)
        s.set_defaults(func=func)
        return s

    s = submitted_cmd("status", "per-trial state of a submitted study", cmd_status)
    s.add_argument("--all", action="store_true", help="also the trials of earlier versions of the study file")
    submitted_cmd("resume", "finish an interrupted study as last submitted; finished trials are kept", cmd_resume)
    submitted_cmd("cancel", "stop a study's running trials (its orch process, its Slurm jobs)", cmd_cancel)
    s = submitted_cmd("prune", "archive the trials of earlier versions of the study file", cmd_prune)
    s.add_argument("--dry-run", action="store_true", help="list what would be archived; change nothing")
    s = submitted_cmd("dashboard", "(re)build <workdir>/<study>/dashboard.html, or serve it live", cmd_dashboard)
    s.add_argument("--tracking-uri", help="read another MLflow store (default: the study's own)")
    s.add_argument("--serve", action="store_true", help="serve on 127.0.0.1, rebuilt while trials run")
    s.add_argument("--port", type=int, help="port for --serve (default: a free one)")
    s.add_argument("--interval", type=int, default=30, help="seconds between rebuilds with --serve (default 30)")
    s = sub.add_parser("fid", help="FID and KID between two image sets (offline, torch-fidelity's Inception)")
    s.add_argument("a", help="dataset:split (mnist:train, fashion_mnist:test, cifar10:train, …) or an image folder")
    s.add_argument("b", help="the same kinds as A")
    s.add_argument("--num", type=int, help="images per side: a fixed random subset (default: all)")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.set_defaults(func=cmd_fid)
    s = sub.add_parser("encode", help="encode images with a VAE into latents a study trains on (dataset latents)")
    s.add_argument("source", help="dataset:split (mnist:train, cifar10:train, …) or an image folder of classes")
    s.add_argument("--vae", required=True, help="a diffusers AutoencoderKL: a save_pretrained directory or a hub id")
    s.add_argument("--out", required=True, help="the output directory (a killed encode continues in it)")
    s.add_argument("--resolution", type=int, default=256, help="image side after ADM's centre crop (default 256)")
    s.add_argument("--batch", type=int, default=64, help="images per VAE call (default 64)")
    s.add_argument("--shard-size", type=int, default=4096, help="latents per shard file (default 4096)")
    posterior = "store a draw from the VAE's posterior (default, as DiT/SiT's feature extraction) or its mean"
    s.add_argument("--posterior", choices=["sample", "mean"], default="sample", help=posterior)
    s.add_argument("--hflip", action="store_true", help="also encode every image mirrored")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.set_defaults(func=cmd_encode)
    s = sub.add_parser("vae", help="train a small VAE on an image dataset, for latent studies without a pretrained one")
    s.add_argument("source", help="dataset:split or an image folder, as for orch encode")
    s.add_argument("--out", required=True, help="a new directory for the VAE (diffusers' save_pretrained layout)")
    s.add_argument("--resolution", type=int, default=32, help="image side after ADM's centre crop (default 32)")
    s.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    s.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    s.add_argument("--limit", type=int, help="train on the first N images only (default: all)")
    s.set_defaults(func=cmd_vae)
    s = submitted_cmd(
        "eval", "evaluate stored checkpoints after training: final/<metric>/… in each trial's run", cmd_eval
    )
    s.add_argument("--trials", nargs="+", metavar="ID", help="these trials only (default: every completed one)")
    s.add_argument("--where", nargs="+", default=[], metavar="KEY=VALUE", help="trials whose config has these values")
    s.add_argument("--checkpoint", default="best", help="best (per NFE, default), last, or a kept training step")
    s.add_argument("--nfe", help="step counts, e.g. 1,2,4 (default: each trial's eval.nfe)")
    s.add_argument("--num", type=int, help="samples per evaluation, e.g. 50000 (default: eval.num_samples)")
    s.add_argument("--metrics", help="e.g. fid,kid,is,prc (prc = precision and recall; default: eval.metrics)")
    s.add_argument("--guidance", help="guidance scales, e.g. 1,1.5 (default: eval.guidance)")
    s.add_argument("--seeds", type=int, default=1, help="seed ranges, each its own noise and labels (default 1)")
    s.add_argument("--device", help="cpu or cuda (default: each trial's train.device)")
    s.add_argument(
        "--backend",
        default="local",
        help="local: in this process (default); ray or slurm: one task or job per trial, with the study's "
        "backend options when it was submitted there",
    )
    s = submitted_cmd("sample", "write a stored checkpoint's samples for external evaluators", cmd_sample)
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
    s = submitted_cmd("table", "the ranking table for a paper: Markdown, LaTeX or CSV", cmd_table)
    s.add_argument("--metric", help="which metric (default: the first alphabetically)")
    s.add_argument("--source", choices=["eval", "final"], default="eval", help="in-training (default) or orch eval's")
    s.add_argument("--format", choices=["markdown", "latex", "csv"], default="markdown")
    s.add_argument(
        "--spread",
        choices=["half-range", "std", "ci95"],
        default="half-range",
        help="± over seeds (default half the range)",
    )
    s.add_argument("--guidance", type=float, default=1.0, help="the guidance scale shown (default 1)")
    s.add_argument("--digits", type=int, default=3, help="decimals of the metric (default 3)")
    s.add_argument("--tracking-uri", help="read another MLflow store (default: the study's own)")
    s = sub.add_parser("describe", help="every option of a study file with its default and meaning")
    s.add_argument("target", nargs="?", help="a section (method, train, …) or one entry (method.lsd, train.lr)")
    s.set_defaults(func=cmd_describe)
    s = sub.add_parser("ui", help="the MLflow UI over a study's store, on 127.0.0.1")
    s.add_argument("study", nargs="?", help="study name (optional when the workdir holds one study)")
    s.add_argument("--workdir", default=default_workdir(), help=workdir_help)
    s.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    s.set_defaults(func=cmd_ui)
    return p


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def main(argv: list[str] | None = None) -> int:
    command_line = parser()
    args, extra = command_line.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # KEY=VALUE after options: argparse leaves them over
    elif extra:
        command_line.error(f"unrecognized arguments: {' '.join(extra)}")
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    from orchestrator.progress import set_quiet
    from orchestrator.tracking.store import SOURCE

    set_quiet(args.quiet)
    SOURCE["name"] = " ".join(["orch", args.command, getattr(args, "study", None) or ""]).strip()
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: end as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush must not raise again
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
