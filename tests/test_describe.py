"""`orch describe`: the option reference read from the registered components, and its copy in docs/reference.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from orch.cli import main
from orch.study.describe import REFERENCE, reference_block

ROOT = Path(__file__).resolve().parents[1]


def test_the_option_reference_is_what_the_code_describes():
    # a fresh interpreter: only the components orch itself registers (tests register their own elsewhere)
    code = "from orch.study.describe import describe; print(describe(), end='')"
    generated = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    reference = (ROOT / REFERENCE).read_text()
    start, end = reference_block(reference)
    assert reference[start:end].strip() == generated.stdout.strip(), f"{REFERENCE} is stale: run `make docs`"


def test_describe_one_component_one_option_and_unknown_targets(capsys):
    assert main(["describe", "method.lsd"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#### `method`") and "**`method.name: lsd`** (default)" in out
    assert "`method.stopgrad`" in out and "method.name: esd" not in out

    assert main(["describe", "train.lr"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert len(rows) == 1 and rows[0].startswith("| `train.lr` |")

    assert main(["describe", "metric.kl"]) == 0
    assert "| `kl` | lower |" in capsys.readouterr().out

    for target, message in [
        ("method.lsdd", "no method 'lsdd' (did you mean 'lsd'?)"),
        ("trian", "no section 'trian' (did you mean 'train'?)"),
        ("train.lrr", "no option train.lrr (did you mean 'lr'?)"),
    ]:
        assert main(["describe", target]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and "Traceback" not in captured.err and captured.out == ""
