"""Images to encode or to train a VAE on: a registered image dataset or a folder, centre-cropped as ADM does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from orch.methods.data.base import DATASETS
from orch.methods.data.images import DatasetFilesError, ImageDataset, list_images


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
