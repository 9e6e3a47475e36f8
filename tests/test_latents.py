"""Latent studies: `orch encode` with a real diffusers AutoencoderKL (small, created and saved here, loaded by its
path as any VAE is), ADM's centre crop, resumable shards, paper B's feature layout, and a trial on the latents
that is evaluated on decoded images."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from orch.cli import main
from orch.execution.build import build_section
from orch.methods.data.encode import MANIFEST
from orch.methods.data.images import DatasetFilesError
from orch.methods.data.latents import read_latents
from orch.methods.data.sources import adm_center_crop
from orch.methods.data.vae import decode_batch, load_vae
from tests.test_fault_tolerance import ROOT, states, trial_runs

pytestmark = pytest.mark.slow  # starts services or trains beyond a few steps (docs/development.md)


def save_vae(path, channels: int) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    )
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def rgb_vae(tmp_path_factory):
    return save_vae(tmp_path_factory.mktemp("vae") / "rgb", 3)


@pytest.fixture(scope="module")
def grey_vae(tmp_path_factory):
    return save_vae(tmp_path_factory.mktemp("vae") / "grey", 1)


def image_folder(root, sizes) -> list:
    """Images of two classes (sub-folders), each a different size and colour; returns the PIL images in the
    order orch lists them (sorted paths)."""
    images = []
    for i, (w, h) in enumerate(sizes):
        folder = root / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    for path in sorted(root.rglob("*.png")):
        images.append(Image.open(path).convert("RGB"))
    return images


def test_adm_centre_crop_halves_then_resizes_the_short_side_and_crops_the_middle():
    left_red = np.zeros((60, 100, 3), np.uint8)
    left_red[:, :50, 0], left_red[:, 50:, 2] = 255, 255
    out = np.asarray(adm_center_crop(Image.fromarray(left_red), 16))
    assert out.shape == (16, 16, 3)
    assert out[:, :6, 0].min() > 200 and out[:, -6:, 2].min() > 200  # the halves stay where they were
    assert out[:, :6, 2].max() < 50 and out[:, -6:, 0].max() < 50
    assert adm_center_crop(Image.new("RGB", (40, 90), (10, 200, 30)), 16).getpixel((8, 8)) == (10, 200, 30)


def test_encode_stores_scaled_posterior_means_and_labels_that_decode_to_images(tmp_path, rgb_vae):
    pil = image_folder(tmp_path / "images", [(40, 30), (16, 16), (50, 70), (33, 20), (16, 24)] * 2)
    out = tmp_path / "latents"
    code = main(["encode", str(tmp_path / "images"), "--vae", rgb_vae, "--out", str(out), "--resolution", "16",
                 "--shard-size", "4", "--batch", "3", "--posterior", "mean", "--device", "cpu"])  # fmt: skip
    assert code == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["count"] == 10 and manifest["classes"] == ["cat", "dog"]
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["scale_factor"] == 0.18215
    assert manifest["vae"] == rgb_vae and len(manifest["vae_sha256"]) == 64 and manifest["crop"] == "adm_center"
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    latents, labels, _ = read_latents(out)
    assert latents.shape == (10, 4, 8, 8) and labels.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]  # cat/ sorts first
    vae = load_vae(rgb_vae)
    pixels = torch.stack([torch.from_numpy(np.array(adm_center_crop(im, 16))).permute(2, 0, 1) for im in pil])
    with torch.no_grad():
        mean = vae.encode(pixels.float() / 127.5 - 1).latent_dist.mean
    torch.testing.assert_close(latents, mean * 0.18215, rtol=1e-4, atol=1e-5)  # the scale factor applied once
    images = decode_batch(vae, latents)
    assert images.shape == (10, 3, 16, 16) and images.dtype == torch.uint8
    direct = vae.decode(mean).sample
    torch.testing.assert_close(images, ((direct.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), atol=1, rtol=0)


def test_a_killed_encode_continues_from_its_finished_shards_to_what_an_uninterrupted_one_writes(tmp_path, grey_vae):
    command = [sys.executable, "-m", "orch.cli", "encode", "mnist:test", "--vae", grey_vae, "--resolution",
               "16", "--shard-size", "500", "--batch", "250", "--device", "cpu"]  # fmt: skip
    killed = tmp_path / "killed"
    encoding = subprocess.Popen([*command, "--out", str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(killed.glob("shard-*.npz"))) < 3 and time.time() < deadline and encoding.poll() is None:
        time.sleep(0.05)
    os.kill(encoding.pid, signal.SIGKILL)
    encoding.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in killed.glob("shard-*.npz")}
    assert 3 <= len(kept) < 20, "the encode was not killed midway"
    assert not json.loads((killed / MANIFEST).read_text())["complete"]
    with pytest.raises(DatasetFilesError, match="unfinished"):
        read_latents(killed)
    assert subprocess.run([*command, "--out", str(killed)], cwd=ROOT, capture_output=True).returncode == 0
    assert all((killed / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())  # kept, not redone
    assert not list(killed.glob(".*"))  # no partial shard left behind
    whole = tmp_path / "whole"
    assert subprocess.run([*command, "--out", str(whole)], cwd=ROOT, capture_output=True).returncode == 0
    resumed, uninterrupted = read_latents(killed), read_latents(whole)
    assert resumed[0].shape == (10000, 4, 8, 8)
    assert torch.equal(resumed[0], uninterrupted[0]) and torch.equal(resumed[1], uninterrupted[1])  # seeded draws


def test_paper_bs_feature_layout_is_read_and_needs_its_vae_named(tmp_path, grey_vae):
    features, labels = tmp_path / "imagenet256_features", tmp_path / "imagenet256_labels"
    features.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((12, 1, 4, 8, 8)).astype(np.float32)
    for i in range(12):  # fast-DiT's extraction: one file per image, numbered, a batch of one
        np.save(features / f"{i}.npy", latents[i])
        np.save(labels / f"{i}.npy", np.array([i % 3]))
    dataset = build_section({"dataset": {"name": "latents", "root": str(tmp_path), "vae": grey_vae}}, "dataset")
    assert len(dataset) == 12 and dataset.shape == (4, 8, 8) and dataset.num_classes == 3
    assert torch.equal(dataset.latents[10], torch.from_numpy(latents[10, 0]))  # numbered order, not 1, 10, 11, 2…
    assert dataset.labels.tolist() == [i % 3 for i in range(12)]
    with pytest.raises(DatasetFilesError, match="records no VAE: set dataset.vae"):
        build_section({"dataset": {"name": "latents", "root": str(tmp_path)}}, "dataset")
    (labels / "11.npy").unlink()
    with pytest.raises(DatasetFilesError, match="12 feature and 11 label files"):
        build_section({"dataset": {"name": "latents", "root": str(tmp_path), "vae": grey_vae}}, "dataset")


def test_orch_vae_trains_a_small_vae_that_encode_loads(tmp_path):
    out = tmp_path / "vae"
    assert main(["vae", "mnist:test", "--out", str(out), "--steps", "3", "--batch", "8", "--limit", "64"]) == 0
    vae = load_vae(str(out))
    assert vae.config.in_channels == 1 and vae.config.scaling_factor != 0.18215  # its own latents' scale
    assert main(["vae", "mnist:test", "--out", str(out)]) == 2  # never overwrites a VAE


def test_bad_encode_inputs_exit_2_with_one_line(tmp_path, grey_vae, capsys):
    out = str(tmp_path / "out")
    assert main(["encode", str(tmp_path / "absent"), "--vae", grey_vae, "--out", out]) == 2
    assert "is neither an image dataset (dataset:split) nor a directory" in capsys.readouterr().err
    assert main(["encode", "mnist:test", "--vae", str(tmp_path), "--out", out]) == 2
    assert "does not hold a diffusers AutoencoderKL" in capsys.readouterr().err and not (tmp_path / "out").exists()
    offline = subprocess.run(
        [sys.executable, "-m", "orch.cli", "encode", "mnist:test", "--vae", "stabilityai/sd-vae-ft-ema",
         "--out", out], cwd=ROOT, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    (line,) = offline.stderr.strip().splitlines()
    assert offline.returncode == 2 and "not a local directory, and the model hub did not give it" in line
    first = ["encode", "mnist:test", "--vae", grey_vae, "--out", out, "--resolution", "16", "--shard-size", "5000"]
    assert main(first) == 0
    assert main([*first[:-4], "--resolution", "32", "--shard-size", "5000"]) == 2
    assert "holds an encoding with other settings (latent_shape, resolution)" in capsys.readouterr().err


def test_a_submission_encodes_its_source_then_a_dit_trial_is_evaluated_on_decoded_images(tmp_path, grey_vae):
    latents = tmp_path / "latents"
    study = tmp_path / "latent.yaml"
    study.write_text(
        "name: latent\n"
        "base:\n"
        f"  dataset: {{name: latents, root: {latents}, source: 'mnist:test', vae: {grey_vae}, resolution: 16,"
        " limit: 512}\n"
        "  model: {name: dit, patch: 2, depth: 2, hidden: 64, heads: 2}\n"
        "  method: {name: meanflow}\n"
        "  train: {steps: 10, batch_size: 16, ema: [0.9], log_every: 5, checkpoint_every: 10, device: cpu}\n"
        "  eval: {every: 10, nfe: [1, 2], metrics: [fid], num_samples: 16, fid_reference: 16, batch_size: 16,"
        " grid: 10}\n"
        "backend: {name: local}\n"
    )
    assert main(["submit", str(study), "--workdir", str(tmp_path / "runs")]) == 0
    assert json.loads((latents / MANIFEST).read_text())["count"] == 10000  # encoded before the trial ran
    (state,) = states(tmp_path / "runs" / "latent").values()
    assert state.status == "completed" and state.result["eval/fid/nfe_1"] > 0 and "eval/fid/nfe_2" in state.result
    (run,) = trial_runs(tmp_path / "runs" / "latent", "latent")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'latent' / 'mlflow.db'}")
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "samples/nfe_1")]
    assert grids == ["samples/nfe_1/step_00000010.png"]
    png = client.download_artifacts(run.info.run_id, grids[0], str(tmp_path))
    assert Image.open(png).size == (16 + 2 * 2, 10 * 16 + 11 * 2)  # decoded 16 × 16 images, one row per class
