"""The commands on image data: fid, encode, vae."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from orch.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_OK,
    raise_interrupt,
)


def fid_input(spec: str):
    """`dataset:split` (a registered image dataset) or an image folder."""
    from orch.execution.build import build_section
    from orch.methods.catalog import DATASETS

    name, _, split = spec.partition(":")
    if name in DATASETS and "images" in DATASETS.get(name).provides:
        return build_section({"dataset": {"name": name, "split": split or "train"}}, "dataset")
    if Path(spec).is_dir():  # at the native size of its first image (Inception resizes to 299 anyway)
        from PIL import Image

        from orch.methods.data.images import list_images

        with Image.open(list_images(Path(spec))[0]) as first:
            side = min(first.size)
        folder = {"name": "image_folder", "root": spec, "crop": None, "resolution": side}
        return build_section({"dataset": folder}, "dataset")
    raise ValueError(f"{spec!r} is neither an image dataset (dataset:split) nor a directory")


FULL_RANK = 2048
"""Images per side below which the 2048-d Inception covariance of FID is rank-deficient."""


def cmd_fid(args) -> int:
    import torch

    from orch.methods.data.images import DatasetFilesError
    from orch.methods.evaluation import fid

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


def add_fid(sub) -> None:
    s = sub.add_parser("fid", help="FID and KID between two image sets (offline, torch-fidelity's Inception)")
    s.add_argument("a", help="dataset:split (mnist:train, fashion_mnist:test, cifar10:train, …) or an image folder")
    s.add_argument("b", help="the same kinds as A")
    s.add_argument("--num", type=int, help="images per side: a fixed random subset (default: all)")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.set_defaults(func=cmd_fid)


def cmd_encode(args) -> int:
    import torch

    from orch.methods.data.encode import encode
    from orch.methods.data.sources import open_source

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


def add_encode(sub) -> None:
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


def cmd_vae(args) -> int:
    from orch.methods.data.sources import open_source
    from orch.methods.data.vae import train_small_vae

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


def add_vae(sub) -> None:
    help_text = "train a small VAE on an image dataset, for latent studies without a pretrained one"
    s = sub.add_parser("vae", help=help_text)
    s.add_argument("source", help="dataset:split or an image folder, as for orch encode")
    s.add_argument("--out", required=True, help="a new directory for the VAE (diffusers' save_pretrained layout)")
    s.add_argument("--resolution", type=int, default=32, help="image side after ADM's centre crop (default 32)")
    s.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    s.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    s.add_argument("--limit", type=int, help="train on the first N images only (default: all)")
    s.set_defaults(func=cmd_vae)
