"""`orch sample`: samples of a stored checkpoint written for external evaluators, streamed to disk chunk by chunk
(50,000 images are never all in memory): an `.npz` in the layout of ADM's evaluation suite (uint8 NHWC `arr_0`,
int64 labels `arr_1` for conditional data), a folder of PNGs, or for 2-D data an `.npy` of points (N, 2). The
samples are those `orch eval` scores for the same checkpoint, NFE, guidance scale and seed range."""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from orch.eval import Unit, Weights
from orch.execution.build import build_trainer
from orch.execution.trial import Trial
from orch.methods.data.images import ImageDataset
from orch.methods.evaluation.generation import eval_labels, generate_chunks
from orch.methods.training.trainer import resolve_device


def write_npy_header(f: BinaryIO, shape: tuple[int, ...], dtype: np.dtype) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(f, header)


def to_nhwc(images: Tensor) -> np.ndarray:
    """uint8 (n, C, H, W) → uint8 (n, H, W, 3): grey images repeated to RGB, as ADM's evaluator reads them."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def sample_stream(
    trial: Trial, weights: Weights, unit: Unit, num: int, classes: list[int] | None, device: str | None
) -> tuple[Iterator[Tensor], Tensor | None, ImageDataset | object]:
    """(chunks of samples, their labels (num,) or None, the dataset) of `num` samples at the unit's NFE, scale
    and seed range. `classes`: the labels cycle through these instead of following the class frequencies."""
    config = trial.parsed.with_eval(num_samples=num)
    evaluation = config.eval
    trainer = build_trainer(config, resolve_device(device or config.train.device))
    net = trainer.ema_net(evaluation.ema)
    net.load_state_dict(weights.load(unit)[0])
    seed = unit.seed(config.raw)
    labels = eval_labels(trainer.dataset, num, seed)
    if labels is not None and classes:
        labels = torch.tensor(classes).repeat(-(-num // len(classes)))[:num]
    args = (trainer.method, net, trainer.interpolant, trainer.dataset, evaluation, unit.nfe, seed, trainer.device)
    return generate_chunks(*args, unit.omega, labels), labels, trainer.dataset


def write_samples(chunks: Iterator[Tensor], labels: Tensor | None, dataset, num: int, out: Path) -> Path:
    """Write the samples to `out` (its suffix says how: .npz, .npy, else a folder of PNGs; the CLI sends 2-D
    points to .npy only) through a temporary
    path renamed at the end, so an interrupted export leaves no partial file. Returns `out`."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    bar = tqdm(total=num, unit="sample", desc=f"sampling into {out.name}", disable=None)
    try:
        if out.suffix == ".npz":
            write_npz(chunks, labels, dataset.shape, num, tmp, bar)
        elif out.suffix == ".npy":
            with open(tmp, "wb") as f:
                write_npy_header(f, (num, *dataset.shape), np.float32)
                for chunk in chunks:
                    f.write(chunk.float().cpu().numpy().tobytes())
                    bar.update(len(chunk))
        else:
            tmp.mkdir()
            done = 0
            for chunk in chunks:
                for pixels in to_nhwc(chunk):
                    name = f"{done:06d}" + (f"_class{int(labels[done])}" if labels is not None else "") + ".png"
                    Image.fromarray(pixels).save(tmp / name)
                    done += 1
                bar.update(len(chunk))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return out


def write_npz(chunks: Iterator[Tensor], labels: Tensor | None, shape: tuple, num: int, path: Path, bar) -> None:
    """ADM's layout, written member by member as np.savez stores it (uncompressed, zip64 for large files)."""
    channels, height, width = shape
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            write_npy_header(f, (num, height, width, 3), np.uint8)
            for chunk in chunks:
                f.write(to_nhwc(chunk).tobytes())
                bar.update(len(chunk))
        if labels is not None:
            with archive.open("arr_1.npy", "w") as f:
                write_npy_header(f, (num,), np.int64)
                f.write(labels.numpy().astype(np.int64).tobytes())
