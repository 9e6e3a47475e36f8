"""How an evaluation's sampling settings are written in metric keys (nfe_<N>, cfg_<ω>)."""

from __future__ import annotations


def scale_name(omega: float) -> str:
    """ω as written in metric keys: 1.5 → "1.5", 2.0 → "2" (Python's shortest round-trip form, no trailing .0)."""
    return f"{omega:g}" if float(omega) == float(f"{omega:g}") else repr(float(omega))


def eval_suffix(nfe: int, omega: float) -> str:
    """`nfe_<N>` at ω = 1 (the unguided names, unchanged) and `nfe_<N>/cfg_<ω>` at any other scale."""
    return f"nfe_{nfe}" if omega == 1.0 else f"nfe_{nfe}/cfg_{scale_name(omega)}"
