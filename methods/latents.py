"""Latent datasets: images encoded once by a VAE (diffusers' AutoencoderKL), trained on as latents, decoded by
the same VAE for evaluation (docs/latents.md).

`encode` writes a directory of shards (`shard-00000.npz`: latents (n, c, h, w) float32 already multiplied by the
VAE's scale factor, and labels (n,)) and a manifest (`manifest.json`: the source, the VAE and its weights' hash,
the scale factor, the resolution and crop, the posterior, the count and the class list). Each shard is written
whole or not at all, so a killed encode continues from its last finished shard. `read_latents` also reads paper
B's released layout (fast-DiT's feature extraction): `<name>_features/` and `<name>_labels/` folders of one .npy
file per image, numbered, latents already scaled.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor

from methods.datasets import DATASETS, LabelledParams
from methods.images import DatasetFilesError, ImageDataset, list_images, to_uint8
from methods.parallel import Gen
from methods.storage import atomic_write_bytes

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD = "shard-{:05d}.npz"
LAYOUT = (
    f"an `orch encode` directory ({MANIFEST} and shard-*.npz) or paper B's feature layout "
    "(<name>_features/ and <name>_labels/ folders of numbered .npy files)"
)


class VAEError(ValueError):
    """A VAE that cannot be loaded: names the source and why."""


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """These libraries' log records below ERROR dropped inside (a hub client's retry notes, one per attempt)."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def load_vae(source: str, device: torch.device | str = "cpu"):
    """diffusers' AutoencoderKL from a local directory (save_pretrained's) or a model-hub id, frozen, in eval
    mode. Raises VAEError naming the source (a hub id where the hub cannot be reached says so)."""
    from diffusers import AutoencoderKL

    local = Path(source).is_dir()
    try:
        with quiet("diffusers", "huggingface_hub"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the hub client's deprecation notes
            vae = AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        where = "the directory does not hold a diffusers AutoencoderKL" if local else (
            "not a local directory, and the model hub did not give it (no network here, or no such id)"
        )  # fmt: skip
        raise VAEError(f"cannot load the VAE {source!r}: {where} ({reason})") from None
    return vae.eval().requires_grad_(False).to(device)


def vae_name(source: str) -> str:
    """How a manifest names a VAE: a local directory by its absolute path, a hub id as given."""
    return str(Path(source).resolve()) if Path(source).is_dir() else source


def weights_sha256(vae) -> str:
    """SHA-256 of the VAE's weights (every tensor of its state dict, by name) and config: what its latents mean."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def adm_center_crop(image, size: int):
    """ADM's preparation (also SiT's and REPA's): halve with a box filter while the short side is at least
    2 × size, resize bicubically so the short side is `size`, then crop the centre size × size. PIL in and out."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


@dataclass
class Source:
    """Images to encode: `count` of them, `load(i, j)` gives images i … j − 1 as uint8 (n, C, size, size) after
    ADM's centre crop; labels (count,) and class names when the source has classes."""

    name: str
    count: int
    load: Callable[[int, int], Tensor]
    labels: Tensor | None
    classes: list[str] | None


def pil_to_chw(image, channels: int) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def dataset_source(dataset: ImageDataset, name: str, size: int) -> Source:
    """A registered image dataset's images (e.g. mnist:train) at `size` after ADM's crop."""
    from PIL import Image

    channels = dataset.shape[0]

    def load(i: int, j: int) -> Tensor:
        images = dataset.images[i:j].numpy()
        pil = (Image.fromarray(im[0] if channels == 1 else im.transpose(1, 2, 0)) for im in images)
        return torch.from_numpy(np.stack([pil_to_chw(adm_center_crop(im, size), channels) for im in pil]))

    labels = dataset.labels if dataset.labels is not None else None
    return Source(name, len(dataset), load, labels, dataset.classes)


def folder_source(root: Path, size: int, channels: int) -> Source:
    """A folder of images (sub-folders are classes, sorted by name, as ImageNet's train folder), ADM-cropped."""
    from PIL import Image, UnidentifiedImageError

    files = list_images(root)
    parts = [p.relative_to(root).parts for p in files]
    classes = sorted({p[0] for p in parts if len(p) > 1}) if all(len(p) > 1 for p in parts) else None
    labels = torch.tensor([classes.index(p[0]) for p in parts]) if classes else None

    def read(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                return pil_to_chw(adm_center_crop(image.convert("RGB"), size), channels)
        except (OSError, UnidentifiedImageError) as e:
            raise DatasetFilesError(f"{path}: not a readable image ({e})") from None

    def load(i: int, j: int) -> Tensor:
        return torch.from_numpy(np.stack([read(p) for p in files[i:j]]))

    return Source(str(root.resolve()), len(files), load, labels, classes)


def open_source(spec: str, resolution: int) -> Source:
    """`dataset:split` (a registered image dataset, with its classes) or an image folder, ADM-cropped to
    `resolution`. Raises ValueError when it is neither, DatasetFilesError when its files are missing."""
    name, _, split = spec.partition(":")
    if name in DATASETS and "images" in DATASETS.get(name).provides:
        entry = DATASETS.get(name)
        options = {"split": split or "train"} | ({"conditional": True} if "classes" in entry.provides else {})
        return dataset_source(
            entry.build(entry.params.model_validate(options)), f"{name}:{options['split']}", resolution
        )
    if Path(spec).is_dir():
        return folder_source(Path(spec), resolution, channels=3)
    raise ValueError(f"{spec!r} is neither an image dataset (dataset:split) nor a directory")


def encode_batch(vae, images: Tensor, posterior: str, gen: torch.Generator | None) -> Tensor:
    """uint8 images (n, C, H, W) → latents (n, c, h, w) × the VAE's scale factor: the posterior's mean, or a draw
    from it. Grey images are repeated to the VAE's input channels."""
    device = next(vae.parameters()).device
    x = images.to(device).float() / 127.5 - 1
    if x.shape[1] != vae.config.in_channels:
        if x.shape[1] != 1:
            raise VAEError(f"{x.shape[1]}-channel images cannot enter a VAE of {vae.config.in_channels} channels")
        x = x.expand(-1, vae.config.in_channels, -1, -1)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        z = dist.mean if posterior == "mean" else dist.sample(generator=gen)
    return (z * vae.config.scaling_factor).float().cpu()


def decode_batch(vae, latents: Tensor) -> Tensor:
    """Latents × scale factor (n, c, h, w) → uint8 images (n, C, H, W) on the CPU."""
    with torch.no_grad():
        x = vae.decode(latents.to(next(vae.parameters()).device) / vae.config.scaling_factor).sample
    return to_uint8(x.float()).cpu()


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())  # a shard is there whole or not at all


def encode(
    source: Source,
    vae_source: str,
    out: Path,
    *,
    resolution: int,
    batch: int,
    device: torch.device,
    hflip: bool = False,
    posterior: Literal["sample", "mean"] = "sample",
    shard_size: int = 4096,
    seed: int = 0,
    say: Callable[[str], None] = print,
) -> dict:
    """Encode `source` into `out` (see the module doc); finished shards of an earlier run with the same
    settings are kept. With `hflip` every image is also encoded mirrored (right after it). A posterior draw
    comes from a generator seeded per shard, so a resumed encode writes what an uninterrupted one would.
    Returns the manifest. Raises VAEError, DatasetFilesError, or ValueError when `out` holds another encoding."""
    vae = load_vae(vae_source, device)
    with torch.no_grad():
        probe = vae.encode(torch.zeros(1, vae.config.in_channels, resolution, resolution, device=device))
    settings = {
        "source": source.name,
        "vae": vae_name(vae_source),
        "vae_sha256": weights_sha256(vae),
        "scale_factor": vae.config.scaling_factor,
        "resolution": resolution,
        "crop": "adm_center",
        "posterior": posterior,
        "hflip": hflip,
        "seed": seed,
        "images": source.count,
        "count": source.count * (2 if hflip else 1),
        "latent_shape": list(probe.latent_dist.mean.shape[1:]),
        "classes": source.classes,
        "shard_size": shard_size,
    }
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        before = json.loads(manifest_path.read_text())
        if {k: v for k, v in before.items() if k != "complete"} != settings:
            differ = sorted(k for k in settings if before.get(k) != settings[k])
            raise ValueError(f"{out} holds an encoding with other settings ({', '.join(differ)}): use another --out")
    atomic_write_bytes(manifest_path, json.dumps(settings | {"complete": False}, indent=1).encode())
    for partial in out.glob(".shard-*.npz.tmp*"):  # what a killed encode was writing: never a shard
        partial.unlink()
    shards = -(-source.count // shard_size)
    started = time.monotonic()
    for index in range(shards):
        path = out / SHARD.format(index)
        if path.exists():
            continue
        lo, hi = index * shard_size, min(source.count, (index + 1) * shard_size)
        gen = torch.Generator(device).manual_seed(seed + index)
        parts, labels = [], []
        for i in range(lo, hi, batch):
            images = source.load(i, min(hi, i + batch))
            rows = torch.stack([images, images.flip(-1)], dim=1).flatten(0, 1) if hflip else images
            parts.append(encode_batch(vae, rows, posterior, gen))
        if source.labels is not None:
            labels = source.labels[lo:hi].repeat_interleave(2 if hflip else 1).numpy()
        save_npz(path, latents=torch.cat(parts).numpy(), labels=np.asarray(labels, dtype=np.int64))
        rate = hi / max(time.monotonic() - started, 1e-9)
        say(f"shard {index + 1}/{shards}: {hi:,}/{source.count:,} images ({rate:.1f} images/s)")
    manifest = settings | {"complete": True}
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=1).encode())
    return manifest


def small_vae(channels: int, widths: tuple[int, ...] = (32, 64, 64), latent_channels: int = 4):
    """A small AutoencoderKL: each width but the last halves the side (32 × 32 images → 4 × 8 × 8 latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=16,
    )


def train_small_vae(
    source: Source, out: Path, *, steps: int, batch: int, lr: float = 1e-3, kl_weight: float = 1e-6, seed: int = 0,
    say: Callable[[str], None] = print,
) -> float:  # fmt: skip
    """Train small_vae on the source's images (reconstruction MSE + kl_weight · KL to N(0, I), AdamW), set its
    scale factor to 1 / the std of its latents (as SD's VAE was given 0.18215), and save it with
    save_pretrained to `out`. For small-scale latent studies (MNIST, CIFAR-10) on machines without a pretrained
    VAE; returns the final reconstruction MSE (pixels in [−1, 1])."""
    torch.manual_seed(seed)
    images = source.load(0, source.count)
    vae = small_vae(images.shape[1])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        x = images[torch.randint(len(images), (batch,), generator=gen)].float() / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        mse = F.mse_loss(vae.decode(posterior.sample(generator=gen)).sample, x)
        loss = mse + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 10) == 0 or step == steps:
            say(f"step {step}/{steps}: reconstruction MSE {mse.item():.4f}")
    with torch.no_grad():
        sample = images[:1024].float() / 127.5 - 1
        std = vae.encode(sample).latent_dist.sample(generator=gen).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(out)
    return mse.item()


def numbered(folder: Path) -> list[Path]:
    files = [p for p in folder.glob("*.npy")]
    try:
        return sorted(files, key=lambda p: int(p.stem))
    except ValueError:
        raise DatasetFilesError(f"{folder}: the .npy files must be numbered (0.npy, 1.npy, …)") from None


def first_latent(array: np.ndarray) -> np.ndarray:
    """One image's latents (c, h, w) float32 from a file holding (c, h, w) or (1, c, h, w)."""
    return array.reshape(-1, *array.shape[-3:])[0].astype(np.float32)


def read_feature_layout(root: Path) -> tuple[Tensor, Tensor, dict]:
    """Paper B's (fast-DiT's) layout: one `<name>_features/<i>.npy` (latents, (1, c, h, w) or (c, h, w)) and one
    `<name>_labels/<i>.npy` per image."""
    features = sorted(root.glob("*_features"))
    if len(features) != 1 or not (labels_dir := root / features[0].name.replace("_features", "_labels")).is_dir():
        raise DatasetFilesError(f"{root}: expected {LAYOUT}")
    latent_files, label_files = numbered(features[0]), numbered(labels_dir)
    if not latent_files or len(latent_files) != len(label_files):
        raise DatasetFilesError(
            f"{root}: {len(latent_files)} feature and {len(label_files)} label files; expected one of each per image"
        )
    latents = torch.from_numpy(np.stack([first_latent(np.load(p, allow_pickle=False)) for p in latent_files]))
    labels = torch.from_numpy(np.array([int(np.load(p, allow_pickle=False).reshape(-1)[0]) for p in label_files]))
    return latents, labels, {"source": str(root.resolve()), "layout": "features"}


def read_latents(root: str | Path) -> tuple[Tensor, Tensor | None, dict]:
    """Latents (N, c, h, w) float32, labels (N,) or None, and the manifest, of an encoded directory (either
    layout). Raises DatasetFilesError naming the directory and what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetFilesError(f"{root}: no such directory; expected {LAYOUT}")
    if not (root / MANIFEST).exists():
        return read_feature_layout(root)
    manifest = json.loads((root / MANIFEST).read_text())
    if not manifest.get("complete"):
        raise DatasetFilesError(f"{root}: the encoding is unfinished; run the same `orch encode` again to finish it")
    latents, labels = [], []
    for index in range(-(-manifest["images"] // manifest["shard_size"])):
        with np.load(root / SHARD.format(index), allow_pickle=False) as shard:
            latents.append(torch.from_numpy(shard["latents"]))
            labels.append(torch.from_numpy(shard["labels"]))
    return torch.cat(latents), (torch.cat(labels) if manifest["classes"] else None), manifest


@functools.cache
def cached_vae(source: str, device: torch.device):
    return load_vae(source, device)


class LatentDataset(ImageDataset):
    """Latents served as they are (already scaled to about unit variance by the VAE's scale factor); samples
    are decoded to images by the same VAE (to_images) for FID and grids, and FID's reference images are the
    training latents decoded (unless eval.fid_statistics names real images' statistics)."""

    def __init__(self, latents: Tensor, identity: dict, vae: str, sigma_data: float, labels=None, classes=None):
        self.latents, self.identity, self.vae, self.hflip = latents, identity, vae, False
        self.shape = tuple(latents.shape[1:])
        self.std = torch.tensor(sigma_data)
        self.labels, self.classes = labels, classes
        self.num_classes = None if classes is None else len(classes)
        self._on_device: dict[torch.device, tuple[Tensor, Tensor | None]] = {}

    def stored(self) -> Tensor:
        return self.latents

    def prepare(self, latents: Tensor, gen: Gen) -> Tensor:
        """Latents are trained on as they are stored."""
        return latents

    def to_images(self, x: Tensor) -> Tensor:
        return decode_batch(cached_vae(self.vae, x.device), x)

    def reference_images(self, count: int | None) -> Tensor:
        """The first `count` training latents (all: null), decoded, as uint8 images."""
        chosen = self.latents[: count or len(self.latents)]
        return torch.cat([self.to_images(part) for part in chosen.split(256)])


class LatentsParams(LabelledParams):
    root: str
    """An `orch encode` output directory, or paper B's released feature layout (<name>_features/ and
    <name>_labels/ folders of numbered .npy files)."""
    conditional: bool = True
    """Train and sample class-conditionally (latent studies are, as the papers' ImageNet runs)."""
    vae: str | None = None
    """The VAE that decodes samples (a diffusers directory or hub id); null: the one the manifest records
    (paper B's layout records none: then this must be set)."""
    limit: PositiveInt | None = None
    """Use only the first `limit` latents (smoke runs); null: all."""
    source: str | None = None
    """Images to encode into `root` first when it holds no finished encoding (`dataset:split` or an image
    folder), with `vae` at `resolution`: the submission encodes them before any trial runs, resumably, as
    `orch encode` does (posterior draws, no flips). null: `root` must hold an encoding."""
    resolution: PositiveInt = 256
    """Image side for `source` (ADM's centre crop)."""
    sigma_data: float = Field(1.0, gt=0.0)
    """Scale of the Gaussian base: 1, as SiT (x_0 ~ N(0, I)); the scale factor brings the latents near unit variance."""


@DATASETS.register("latents", LatentsParams, provides=("images", "classes"))
def build_latents(params: LatentsParams) -> LatentDataset:
    """VAE latents written by `orch encode` (or paper B's feature layout), decoded by the VAE for evaluation."""
    manifest_path = Path(params.root, MANIFEST)
    recorded = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if params.source is not None and recorded.get("complete"):
        asked = {"resolution": params.resolution, "vae": vae_name(params.vae) if params.vae else None}
        if differ := [k for k, v in asked.items() if v is not None and recorded.get(k) != v]:
            raise DatasetFilesError(
                f"{params.root} holds an encoding with another {' and '.join(differ)} than dataset.source asks for "
                f"({', '.join(f'{k} {recorded.get(k)}' for k in differ)}): choose another dataset.root"
            )
    if params.source is not None and not recorded.get("complete"):
        if params.vae is None:
            raise DatasetFilesError(f"dataset.source {params.source!r}: set dataset.vae, the VAE that encodes it")
        try:
            source = open_source(params.source, params.resolution)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            encode(source, params.vae, Path(params.root), resolution=params.resolution, batch=64, device=device,
                   say=lambda line: log.info("encoding %s into %s: %s", params.source, params.root, line))  # fmt: skip
        except (VAEError, ValueError) as e:
            raise DatasetFilesError(str(e)) from None
    latents, labels, manifest = read_latents(params.root)
    vae = params.vae or manifest.get("vae")
    if vae is None:
        raise DatasetFilesError(f"{params.root}: the feature layout records no VAE: set dataset.vae")
    if params.limit is not None:
        latents, labels = latents[: params.limit], None if labels is None else labels[: params.limit]
    identity = {"name": "latents", "source": manifest.get("source"), "vae": vae,
                "vae_sha256": manifest.get("vae_sha256"), "limit": params.limit}  # fmt: skip
    if not params.conditional:
        return LatentDataset(latents, identity, vae, params.sigma_data)
    if labels is None:
        raise DatasetFilesError(f"{params.root}: the latents have no labels; set dataset.conditional: false")
    classes = manifest.get("classes") or [str(i) for i in range(int(labels.max()) + 1)]
    return LatentDataset(latents, identity | {"classes": classes}, vae, params.sigma_data, labels, classes)
