"""Generation metrics under data-parallel ranks (DDP and FSDP, gloo on the CPU): each rank
answers its share of every batch, the ranks add their sums, and under FSDP a rank whose rows
are done, or that has none, keeps joining the forwards until every rank is done.

The validation rows are chosen against the tiny model's own greedy answers (found in this
process), so the base model's eval_exact_match at step 0 is known before the ranks start."""

import json
import random

import pytest

from peft_core import catalogue, task_metrics
from peft_core.decoding import greedy_ids
from tests.peft_core.test_cli_eval_metrics import date_rows, write_jsonl
from tests.peft_core.test_distributed import _train

pytestmark = pytest.mark.slow
NEW_TOKENS = 8


def _rows_with_known_answers(model_cache) -> tuple[list[dict], list[str]]:
    """17 validation rows and the base model's answers to them. With --batch-size 2 the rows
    are answered 16 at a time (train.generation_rows) over 2 ranks: rank 0's 8 prompts run all
    NEW_TOKENS steps, rank 1's 8 end at eos before, so rank 1 is done first; the 17th row,
    alone in the last batch, leaves rank 1 without a row."""
    model, tokenizer = catalogue.load_model("tiny-llama", "causal-lm", cache_dir=model_cache)
    rng = random.Random(0)
    prompts = [f"date {rng.randrange(10**6)}" for _ in range(4096)]
    early, full = [], []
    for start in range(0, len(prompts), 64):
        chunk = prompts[start : start + 64]
        answers = greedy_ids(model, tokenizer, chunk, max_new_tokens=NEW_TOKENS)
        for prompt, ids in zip(chunk, answers, strict=True):
            answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if len(ids) < NEW_TOKENS - 2:
                early.append((prompt, answer))
            elif len(ids) == NEW_TOKENS and answer and "\x00" not in answer:
                full.append((prompt, answer))
        if len(early) >= 8 and len(full) >= 9:
            break
    assert len(early) >= 8 and len(full) >= 9
    chosen = [*full[:8], *early[:8], full[8]]
    right = {0, 3, 16}  # the others' completion is not their answer
    rows = [
        {"prompt": prompt, "completion": answer if i in right else "zzz"}
        for i, (prompt, answer) in enumerate(chosen)
    ]
    return rows, [answer for _, answer in chosen]


def _step_zero(output, key: str) -> float:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return next(line[key] for line in lines if line["step"] == 0 and key in line)


@pytest.mark.parametrize(
    ("parallel", "method"),
    [("ddp", "lora"), ("fsdp", "prompt")],  # FSDP with virtual tokens in the KV cache
)
def test_ranks_score_what_one_process_scores(tmp_path, model_cache, parallel, method):
    val_rows, answers = _rows_with_known_answers(model_cache)
    completions = [row["completion"] for row in val_rows]
    scorers = {name: task_metrics.GENERATION_SCORERS[name] for name in ("exact_match", "contains")}
    expected = {
        name: sum(map(score, answers, completions)) / len(answers)
        for name, score in scorers.items()
    }
    assert expected["exact_match"] == pytest.approx(3 / 17)
    train_file = write_jsonl(tmp_path / "train.jsonl", date_rows(8))
    val_file = write_jsonl(tmp_path / "val.jsonl", val_rows)
    output = _train(
        tmp_path, parallel, "--model", "tiny-llama", "--data", str(train_file), "--val-data",
        str(val_file), "--method", method, "--steps", "1", "--batch-size", "2",
        "--eval-batches", "9", "--eval-metrics", "exact_match,contains",
        "--max-new-tokens", str(NEW_TOKENS), "--devices", "2", "--parallel", parallel,
    )  # fmt: skip
    for name, value in expected.items():
        assert _step_zero(output, f"eval_{name}") == pytest.approx(value), name
    lines = (output / "metrics.jsonl").read_text().splitlines()
    final = [json.loads(line) for line in lines if "eval_exact_match" in line][-1]
    assert final["step"] == 1 and 0.0 <= final["eval_exact_match"] <= 1.0
