"""Data-parallel training with torchrun: N processes, each with 1/N of every batch, train the
adapter one process trains with the whole batch, whole bases on each (DDP) or split over them
(FSDP). The loss is weighted by supervised tokens
across ranks and the LoRA dropout masks are drawn for the whole batch on every rank, so the
adapters agree to the bit on the CPU (gloo); the acceptance asks for 1e-4."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _train(tmp_path: Path, name: str, *args: str) -> Path:
    """`peftlab train` in a child; without --eval-metrics, the loss alone (generation metrics
    under ranks: test_distributed_eval_metrics.py)."""
    output = tmp_path / name
    if "--eval-metrics" not in args:
        args = (*args, "--eval-metrics", "none")
    done = subprocess.run(
        [sys.executable, "-m", "peft_core.cli", "train", "--device", "cpu", "--output",
         str(output), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (output / "stdout.txt").write_text(done.stdout)
    return output


def _largest_difference(a: Path, b: Path) -> float:
    first, second = (
        load_file(a / "adapter_model.safetensors"),
        load_file(b / "adapter_model.safetensors"),
    )
    assert first.keys() == second.keys()
    return max((first[k] - second[k]).abs().max().item() for k in first)


def _losses(directory: Path) -> list[float]:
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train_loss"] for line in lines if "train_loss" in line]


def test_two_processes_train_the_adapter_one_process_trains(tmp_path):
    """The acceptance's command: LoRA with its default dropout (0.05), 3 steps of 4 rows."""
    common = ["--model", "tiny-llama", "--dataset", "sample-instructions", "--method", "lora",
              "--steps", "3", "--batch-size", "4", "--seed", "5"]  # fmt: skip
    two = _train(tmp_path, "A", *common, "--devices", "2")
    one = _train(tmp_path, "B", *common, "--devices", "1")
    assert _largest_difference(two, one) <= 1e-4
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-6)


def test_uneven_shares_accumulation_and_classification_weigh_tokens_and_rows(tmp_path):
    """3 processes over batches of 5 rows (shares of 2, 2 and 1), 2 micro-batches a step, a
    classifier (row-weighted loss) and a causal LM (token-weighted) alike. The 3 processes
    also recompute activations (gradient checkpointing): the recomputed forward must draw
    the dropout masks its forward drew (it once drew a rank's own, 5.8e-4 off)."""
    for task_args in (
        ["--dataset", "sample-sentiment", "--method", "lora"],
        ["--dataset", "sample-instructions", "--method", "dora"],
    ):
        common = ["--model", "tiny-llama", *task_args, "--steps", "2", "--batch-size", "5",
                  "--grad-accum", "2", "--seed", "3"]  # fmt: skip
        name = task_args[1]
        three = _train(tmp_path, f"{name}-3", *common, "--devices", "3", "--gradient-checkpointing")
        one = _train(tmp_path, f"{name}-1", *common, "--devices", "1")
        assert _largest_difference(three, one) <= 1e-5, name


def _held(output: str) -> tuple[int, int]:
    """(held, whole) from the CLI's "FSDP: this process holds H of the base's W" line."""
    match = re.search(r"FSDP: this process holds ([\d,]+) of the base's ([\d,]+)", output)
    assert match, output
    return int(match[1].replace(",", "")), int(match[2].replace(",", ""))


@pytest.mark.parametrize(
    ("method", "devices", "extra"),
    [
        # 3 processes over 4 rows: the third has none and joins every forward with one
        # row weighted 0 (FSDP gathers weights collectively); accumulation, checkpointing
        ("lora", 3, ["--grad-accum", "2", "--gradient-checkpointing"]),
        ("prefix", 2, []),  # virtual keys beside the split attention
        ("mam", 2, []),  # prefix + parallel adapter
    ],
)
def test_fsdp_splits_the_base_and_trains_the_adapter_one_process_trains(
    tmp_path, method, devices, extra
):
    common = ["--model", "tiny-llama", "--dataset", "sample-instructions", "--method", method,
              "--steps", "2", "--batch-size", "4", "--seed", "7", *extra]  # fmt: skip
    split = _train(tmp_path, "fsdp", *common, "--devices", str(devices), "--parallel", "fsdp")
    one = _train(tmp_path, "one", *common, "--devices", "1")
    assert _largest_difference(split, one) <= 1e-5
    assert _losses(split) == pytest.approx(_losses(one), abs=1e-6)
    held, whole = _held((split / "stdout.txt").read_text())
    # rank 0 holds a 1/devices share of every split tensor, rounded up (torch.chunk)
    assert whole / devices <= held <= 1.05 * whole / devices


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "9"], "--devices must be 1 to 8"),
        (["--devices", "4", "--batch-size", "2"], "needs --batch-size of at least 4"),
        (["--parallel", "fsdp"], "ask for 2 or more devices, or use ddp"),
        (["--devices", "2", "--parallel", "fsdp", "--quantize", "nf4"], "cannot split a nf4"),
    ],
)
def test_device_counts_that_cannot_work_are_usage_errors(tmp_path, args, message):
    done = subprocess.run(
        [sys.executable, "-m", "peft_core.cli", "train", "--model", "tiny-llama", "--dataset",
         "sample-instructions", "--device", "cpu", "--output", str(tmp_path / "x"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 2 and message in done.stderr
