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
    assert {"runs_list.py", "inference_overhead.py", "sdk_overhead.py"} <= names


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


def test_peft_vs_hf_says_whether_each_goal_was_met(capsys):
    sys.path.insert(0, str(SCRIPTS[0].parent.parent))
    from benchmarks import peft_vs_hf

    rows = [
        {"method": "lora all-linear d=0.05", "ratio": 0.95},
        {"method": "dora all-linear d=0.05", "ratio": 0.75},
        {"method": "lora q,v", "ratio": 0.99},  # no goal of its own
    ]
    peft_vs_hf.print_goals(rows)
    assert capsys.readouterr().out.splitlines() == [
        "goal: lora all-linear d=0.05 ≤ 0.9 × HF PEFT: 0.950, missed by 0.050",
        "goal: dora all-linear d=0.05 ≤ 0.8 × HF PEFT: 0.750, met",
    ]


@pytest.mark.slow
def test_memory_measures_both_sides_in_children_and_prints_the_goal():
    """memory.py end to end on the small Llama at a toy size: each side trains in its own
    child, and the verdict line carries the measured ratio."""
    script = SCRIPTS[0].parent / "memory.py"
    command = [sys.executable, str(script), "--model", "small", "--batch", "2", "--seq", "32"]
    command += ["--setting", "bf16+ckpt", "--no-trainer", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    row, verdict = result.stdout.strip().splitlines()[-2:]
    assert row.startswith("bf16+ckpt") and "ours" in row and "hf" in row and "failed" not in row
    assert verdict.startswith("bf16+ckpt: ours / HF PEFT peak ") and "(goal ≤ 0.6)" in verdict


def test_sdk_overhead_times_both_sides_and_prints_the_goal():
    """sdk_overhead.py end to end at a toy size (its local sink, 2 ms steps): three sides
    timed on both clocks, the counted work, and the two verdict lines carrying the figures."""
    script = SCRIPTS[0].parent / "sdk_overhead.py"
    command = [sys.executable, str(script), "--step-ms", "2", "--block-steps", "10"]
    result = subprocess.run(
        [*command, "--rounds", "2"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["bare", "bare'", "logging"]
    assert "the work itself, per step: log()" in result.stdout
    side_by_side, counted = lines[-2:]
    assert side_by_side.startswith("goal: tracking ≤ 1% of a step, side by side (cpu): ")
    assert counted.startswith("goal: tracking ≤ 1% of a step, counted: ")
    assert counted.endswith((", met",)) or ", missed by " in counted
