"""The VAE of latent datasets: diffusers' AutoencoderKL loaded from a path or hub id, its encode and decode,
and a small one trained here for studies without a pretrained VAE (`orch vae`)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from orch.methods.data.images import to_uint8
from orch.methods.data.sources import Source


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


@functools.cache
def cached_vae(source: str, device: torch.device):
    return load_vae(source, device)
