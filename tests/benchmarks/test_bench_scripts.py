"""Every benchmark script starts and explains its options: a refactor that breaks one fails
here, not in the next person's `make bench`."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted(
    path
    for path in (Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py")
    if not path.name.startswith("_")
)


def test_there_are_benchmarks():
    names = {path.name for path in SCRIPTS}
    assert {"peft_vs_hf.py", "warm_start.py", "metrics_ingest.py", "compare_query.py"} <= names
    assert {"runs_list.py", "inference_overhead.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_a_benchmark_prints_its_usage(script):
    result = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_peft_vs_hf_runs_lora_and_dora_at_each_dropout_on_both_sides():
    """--dropout puts the rows at the product's default (0.05) beside the dropout-0 ones,
    with the same dropout in our config and HF PEFT's."""
    sys.path.insert(0, str(SCRIPTS[0].parent.parent))
    from benchmarks import peft_vs_hf

    default = {case.name for case in peft_vs_hf.select(peft_vs_hf.parse_args([]))}
    assert {"lora all-linear", "lora all-linear d=0.05", "dora q,v d=0.05"} <= default
    chosen = peft_vs_hf.select(peft_vs_hf.parse_args(["--dropout", "0.1"]))
    lora = next(case for case in chosen if case.name == "lora q,v d=0.1")
    assert lora.ours().dropout == 0.1 and lora.hf().lora_dropout == 0.1
    assert "lora q,v" not in {case.name for case in chosen}
