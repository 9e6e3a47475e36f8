"""`orch encode`: images from a dataset or folder, centre-cropped as ADM does, encoded by a VAE into atomic
shards with a manifest (resumable shard by shard)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from orch.methods.data.sources import Source
from orch.methods.data.vae import encode_batch, load_vae, vae_name, weights_sha256
from orch.methods.runtime.storage import atomic_write_bytes

MANIFEST = "manifest.json"


SHARD = "shard-{:05d}.npz"


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
