"""`orch describe`: the option reference read from the registered components, and the README's copy of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from orchestrator.cli import main
from orchestrator.study.describe import readme_block

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_reference_is_what_the_code_describes():
    # a fresh interpreter: only the components orch itself registers (tests register their own elsewhere)
    code = "from orchestrator.study.describe import describe; print(describe(), end='')"
    generated = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    readme = (ROOT / "README.md").read_text()
    start, end = readme_block(readme)
    assert readme[start:end].strip() == generated.stdout.strip(), "README option reference is stale: run `make docs`"


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
