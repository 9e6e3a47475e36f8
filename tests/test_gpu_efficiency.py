"""bench/gpu_efficiency.py on this CPU: the FLOPs it counts for a training step equal the network's arithmetic,
every variant (fp32, bf16, bf16 + compile) is measured side by side, MFU is achieved FLOP/s over the given peak,
and for an image study the Inception and sampling precision figures come out."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # starts services or trains beyond a few steps (docs/development.md)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "gpu_efficiency.py"


def run_bench(tmp_path: Path, study: dict, *args: str) -> dict:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "figures.json"
    command = [sys.executable, str(BENCH), str(path), "--device", "cpu", "--json", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MFU" in result.stdout
    return json.loads(out.read_text())


def test_flops_per_sample_are_the_mlps_arithmetic_and_every_variant_is_measured(tmp_path):
    study = {
        "name": "mlp_efficiency",
        "base": {"model": {"name": "mlp", "width": 32, "depth": 2}, "train": {"batch_size": 256, "ema": [0.9]},
                 "eval": {"batch_size": 512}},
        "grid": {"method.name": ["fm", "lsd"]},
    }  # fmt: skip
    figures = run_bench(tmp_path, study, "--steps", "3", "--warmup", "2", "--peak-tflops", "0.5")
    fm, lsd = figures["trials"]["name=fm"], figures["trials"]["name=lsd"]
    # input (x, a, b) = 4 → 32 → 32 → 2: a forward is 2·Σ in·out per sample; the backward computes every
    # weight gradient (2·Σ in·out again) and every input gradient but the first layer's (x needs none)
    layers = [(4, 32), (32, 32), (32, 2)]
    forward = 2 * sum(i * o for i, o in layers)
    assert fm["gflop_per_sample"] * 1e9 == forward + forward + (forward - 2 * 4 * 32)
    assert lsd["gflop_per_sample"] > fm["gflop_per_sample"]  # LSD adds a JVP pass and its backward
    for trial in (fm, lsd):
        assert set(trial["variants"]) == {"fp32", "bf16", "bf16+compile"}
        for row in trial["variants"].values():
            assert row["sec_per_kimg"] > 0 and row["mem_mb"] > 0 and row["sample_per_s_nfe1"] > 0
            achieved = trial["gflop_per_sample"] * 1e9 * row["samples_per_s"]
            assert math.isclose(row["tflops_per_s"], achieved / 1e12, rel_tol=1e-9)
            assert math.isclose(row["mfu"], achieved / 0.5e12, rel_tol=1e-9)


def test_image_study_reports_inception_throughput_and_the_fid_difference_of_bf16(tmp_path):
    study = {
        "name": "unet_efficiency",
        "base": {
            "dataset": {"name": "mnist", "limit": 200},
            "model": {"name": "unet", "channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "time_scale": 1000.0},
            "method": {"name": "fm"},
            "train": {"batch_size": 16, "ema": [0.9]},
            "eval": {"metrics": ["fid"], "batch_size": 6},
        },
    }
    # fp32 only: bf16 steps of this tiny UNet are slow on CPU (about 5 s against 0.2 s, docs/performance.md)
    figures = run_bench(tmp_path, study, "--steps", "2", "--warmup", "1", "--variants", "fp32", "--fid-images", "24")
    (trial,) = figures["trials"].values()
    assert set(trial["variants"]) == {"fp32"}
    assert all(row["mfu"] is None for row in trial["variants"].values())  # a CPU has no peak in the table
    fp32 = trial["variants"]["fp32"]
    assert fp32["sample_fid_fp32"] > 0 and fp32["sample_fid_bf16"] > 0
    inception = figures["inception"]
    assert inception["inception_img_per_s_fp32"] > 0 and inception["inception_img_per_s_bf16"] > 0
    # bf16 features move FID between the same two image sets by a few per cent at most (measured: see
    # docs/performance.md), far less than the FID itself
    fp32_fid, bf16_fid = inception["fid_halves_fp32"], inception["fid_halves_bf16"]
    assert fp32_fid > 0 and abs(bf16_fid - fp32_fid) < 0.05 * fp32_fid
