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
