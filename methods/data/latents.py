"""Latent datasets: images encoded once by a VAE (diffusers' AutoencoderKL), trained on as latents, decoded by
the same VAE for evaluation (docs/latents.md).

`encode` writes a directory of shards (`shard-00000.npz`: latents (n, c, h, w) float32 already multiplied by the
VAE's scale factor, and labels (n,)) and a manifest (`manifest.json`: the source, the VAE and its weights' hash,
the scale factor, the resolution and crop, the posterior, the count and the class list). Each shard is written
whole or not at all, so a killed encode continues from its last finished shard. `read_latents` also reads paper
B's released layout (fast-DiT's feature extraction): `<name>_features/` and `<name>_labels/` folders of one .npy
file per image, numbered, latents already scaled."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from orch.methods.data.base import DATASETS, LabelledParams
from orch.methods.data.encode import MANIFEST, SHARD, encode
from orch.methods.data.images import DatasetFilesError, ImageDataset
from orch.methods.data.sources import open_source
from orch.methods.data.vae import VAEError, cached_vae, decode_batch, vae_name
from orch.methods.runtime.parallel import Gen

log = logging.getLogger(__name__)


LAYOUT = (
    f"an `orch encode` directory ({MANIFEST} and shard-*.npz) or paper B's feature layout "
    "(<name>_features/ and <name>_labels/ folders of numbered .npy files)"
)


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
