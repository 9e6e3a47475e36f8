"""Metric keys: how every value a trial logs is named, built and parsed here only. The science layer writes
them (training statistics, evaluations), orchestration and the dashboards read them back through
orch.tracking.schema, which lists them with every other name orch writes to MLflow.

    train/loss, train/grad_norm, train/lr, train/loss/<term>, train/target_std/<term>[/bin_<k>]
    cost/<name>                          (COST_NAMES)
    eval/<metric>/nfe_<N>[/cfg_<ω>]      an evaluation during training; no cfg_ part at ω = 1
    final/<metric>/nfe_<N>[/cfg_<ω>]     `orch eval`'s mean over seed ranges; + /seed_<k>, + /spread
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "AMP_SKIPPED",
    "COST_NAMES",
    "EVAL",
    "FINAL",
    "GRAD_NORM",
    "JVP_UNRESOLVED",
    "LOSS_SCALE",
    "LR",
    "SPREAD",
    "TARGET_STD",
    "TRAIN_LOSS",
    "EvalKey",
    "cost_key",
    "eval_key",
    "eval_suffix",
    "is_eval_key",
    "short_name",
    "parse_eval_key",
    "scale_name",
    "seed_key",
    "spread_key",
    "target_std_key",
    "term_loss_key",
    "parse_target_std_key",
    "parse_term_loss_key",
    "series_key",
]

EVAL, FINAL = "eval", "final"
"""Sources of evaluations: during training, and `orch eval`'s of stored checkpoints."""
TRAIN_LOSS, GRAD_NORM, LR = "train/loss", "train/grad_norm", "train/lr"
AMP_SKIPPED, LOSS_SCALE = "train/amp_skipped_steps", "train/loss_scale"
JVP_UNRESOLVED = "train/jvp_unresolved"
"""Finite-difference JVPs: samples so far whose derivative was 0 because no step stayed in the time domain."""
TARGET_STD = "train/target_std"
COST_NAMES = ("sec_per_kimg", "samples_per_sec", "peak_mem_mb", "fwd_per_sample", "jvp_per_sample", "device_hours")
SPREAD = "spread"

METRIC_NAME = re.compile(r"[a-z0-9_]+")
"""What a metric's name may be (register_metric checks it), so that its keys parse back."""
EVAL_KEY = re.compile(
    r"^(?P<source>eval|final)/(?P<metric>[a-z0-9_]+)/nfe_(?P<nfe>\d+)(?:/cfg_(?P<omega>[0-9.e+-]+))?"
    r"(?:/(?P<rest>seed_\d+|spread))?$"
)
TERM_LOSS_KEY = re.compile(r"^train/loss/(?P<term>[^/]+)$")
TARGET_STD_KEY = re.compile(r"^train/target_std/(?P<term>[^/]+)(?:/bin_(?P<bin>\d+))?$")


def scale_name(omega: float) -> str:
    """ω as written in metric keys: 1.5 → "1.5", 2.0 → "2" (Python's shortest round-trip form, no trailing .0)."""
    return f"{omega:g}" if float(omega) == float(f"{omega:g}") else repr(float(omega))


def eval_suffix(nfe: int, omega: float = 1.0) -> str:
    """`nfe_<N>` at ω = 1 (the unguided names, unchanged) and `nfe_<N>/cfg_<ω>` at any other scale."""
    return f"nfe_{nfe}" if omega == 1.0 else f"nfe_{nfe}/cfg_{scale_name(omega)}"


def eval_key(metric: str, nfe: int, omega: float = 1.0, source: str = EVAL) -> str:
    """e.g. eval/kl/nfe_2, eval/fid/nfe_1/cfg_1.5, final/fid/nfe_1."""
    return f"{source}/{metric}/{eval_suffix(nfe, omega)}"


def series_key(metric: str, suffix: str, source: str = FINAL) -> str:
    """<source>/<metric>/<suffix>, for a suffix as eval_suffix wrote it (e.g. read back from a tag)."""
    return f"{source}/{metric}/{suffix}"


def seed_key(metric: str, nfe: int, omega: float, seed_range: int) -> str:
    """`orch eval`'s value of one seed range: final/<metric>/nfe_<N>[/cfg_<ω>]/seed_<k>."""
    return f"{eval_key(metric, nfe, omega, FINAL)}/seed_{seed_range}"


def spread_key(metric: str, nfe: int, omega: float) -> str:
    """`orch eval`'s half range over seed ranges: final/<metric>/nfe_<N>[/cfg_<ω>]/spread."""
    return f"{eval_key(metric, nfe, omega, FINAL)}/{SPREAD}"


def cost_key(name: str) -> str:
    """cost/<name>, one of COST_NAMES."""
    return f"cost/{name}"


def term_loss_key(term: str) -> str:
    """A loss term's mean: train/loss/<term>."""
    return f"{TRAIN_LOSS}/{term}"


def target_std_key(term: str, bin_index: int | None = None) -> str:
    """The spread of a term's regression target norms: train/target_std/<term>, per time bin …/bin_<k>."""
    return f"{TARGET_STD}/{term}" + ("" if bin_index is None else f"/bin_{bin_index}")


def parse_term_loss_key(key: str) -> str | None:
    """The term of a train/loss/<term> key, else None."""
    found = TERM_LOSS_KEY.match(key)
    return found["term"] if found else None


def parse_target_std_key(key: str) -> tuple[str, int | None] | None:
    """(term, time bin or None) of a train/target_std/<term>[/bin_<k>] key, else None."""
    found = TARGET_STD_KEY.match(key)
    return (found["term"], int(found["bin"]) if found["bin"] is not None else None) if found else None


@dataclass(frozen=True)
class EvalKey:
    """A parsed evaluation key."""

    source: str
    """EVAL or FINAL."""
    metric: str
    nfe: int
    omega: float
    rest: str = ""
    """"" for a value, "seed_<k>" or "spread" for `orch eval`'s per-seed-range value and spread."""

    @property
    def suffix(self) -> str:
        return eval_suffix(self.nfe, self.omega)

    @property
    def file_stem(self) -> str:
        """How files of this evaluation are named: <metric>_nfe_<N>[_cfg_<ω>] (e.g. a best checkpoint's)."""
        return f"{self.metric}_{self.suffix.replace('/', '_')}"


def parse_eval_key(key: object) -> EvalKey | None:
    """The parts of an eval/… or final/… key; None for any other key."""
    found = EVAL_KEY.match(str(key))
    if found is None:
        return None
    omega = float(found["omega"]) if found["omega"] is not None else 1.0
    return EvalKey(found["source"], found["metric"], int(found["nfe"]), omega, found["rest"] or "")


def is_eval_key(key: str) -> bool:
    """Whether a key is an evaluation during training (eval/…)."""
    return key.startswith(EVAL + "/")


def short_name(key: str) -> str:
    """A key without its eval/ or train/ section, for a progress line (kl/nfe_1, loss)."""
    return key.removeprefix(EVAL + "/").removeprefix("train/")
