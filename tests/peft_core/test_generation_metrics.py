"""Greedy decoding for the generation metrics (peft_core/decoding.py) and the task metrics of an
evaluation (peft_core/train.py), on tiny models: batched answers are each prompt's own answer,
for every method, and the figures are the mean of what the answers score."""

import pytest
import torch

import peft_core
from peft_core import catalogue
from peft_core.configs import TrainConfig
from peft_core.decoding import greedy_completions, greedy_ids, left_padded, until_eos
from peft_core.task_metrics import chrf
from peft_core.tiny import build_tiny
from peft_core.train import evaluate, generation_metrics
from tests.peft_core.method_cases import CASES

PROMPTS = ["hi", "reverse the word apple", "a longer prompt: 2024-03-05 in words, please", "x"]
# One case of each method (the first listed), each on a decoder with rotary and absolute positions
CAUSAL_CASES = list({case.id.split("-")[0]: case for case in reversed(CASES)}.values())


@pytest.fixture(scope="module")
def tokenizer(model_cache):
    return catalogue.load_model("tiny-llama", "causal-lm", cache_dir=model_cache)[1]


def _adapted(kind: str, config) -> torch.nn.Module:
    """A tiny model with the adapter moved away from its init, so it changes the answers."""
    model = build_tiny(kind)
    torch.manual_seed(0)
    peft_core.apply(model, config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    return model


def test_left_padding_puts_every_prompt_at_the_right():
    ids, mask = left_padded([[5, 6, 7], [9]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_an_answer_ends_at_its_first_eos():
    assert until_eos([7, 8, 2, 9, 0, 0], eos=2) == [7, 8]
    assert until_eos([7, 8], eos=2) == [7, 8]


@pytest.mark.parametrize("case", CAUSAL_CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_answers_are_each_prompts_own(case, kind, tokenizer):
    """Left padding and a method's virtual tokens (prompt, prefix, MAM) change no answer."""
    model = _adapted(kind, case.config(kind, "causal-lm"))
    batched = greedy_ids(model, tokenizer, PROMPTS, max_new_tokens=8)
    alone = [greedy_ids(model, tokenizer, [p], max_new_tokens=8)[0] for p in PROMPTS]
    assert batched == alone
    assert any(batched)  # something was generated to compare


def test_generation_metrics_are_the_mean_over_the_first_rows(tokenizer):
    """Rows whose completion is the model's own answer score 1, the others 0; only the first
    eval_batches × batch_size rows count."""
    model = build_tiny("llama")
    answers = greedy_completions(model, tokenizer, PROMPTS, max_new_tokens=6)
    rows = [
        {"prompt": PROMPTS[0], "completion": answers[0]},
        {"prompt": PROMPTS[1], "completion": answers[1] + " and more"},
        {"prompt": PROMPTS[2], "completion": answers[2]},
        {"prompt": PROMPTS[3], "completion": answers[3]},  # the 4th row: past the bound
    ]
    config = TrainConfig(
        batch_size=2, eval_batches=1, max_new_tokens=6, eval_metrics=("exact_match", "contains")
    )
    scored = generation_metrics(model, tokenizer, rows, config=config, names=config.eval_metrics)
    assert scored == {"eval_exact_match": 0.5, "eval_contains": 0.5}
    wider = TrainConfig(batch_size=2, eval_batches=2, max_new_tokens=6, eval_metrics=("chrf",))
    metrics = evaluate(model, tokenizer, task="causal-lm", rows=rows, config=wider)
    assert set(metrics) == {"eval_loss", "eval_chrf"}
    row_1 = chrf(answers[1], answers[1] + " and more")  # rows 0, 2 and 3 are exact: 1 each
    assert row_1 < 1 and metrics["eval_chrf"] == pytest.approx((3 + row_1) / 4)


def test_classification_metrics_match_the_logits(tokenizer):
    model = build_tiny("llama", task="seq-cls", num_labels=3)
    model.config.pad_token_id = 0
    rows = [{"text": f"review number {i} " * (i % 3 + 1), "label": "abc"[i % 3]} for i in range(9)]
    config = TrainConfig(batch_size=4, eval_metrics=("accuracy", "macro_f1"))
    metrics = evaluate(
        model, tokenizer, task="seq-cls", rows=rows, config=config, label_names=["a", "b", "c"]
    )
    with torch.no_grad():
        guesses = [
            int(model(**tokenizer(row["text"], return_tensors="pt")).logits.argmax())
            for row in rows
        ]
    truth = [i % 3 for i in range(9)]
    f1s = []
    for c in range(3):
        tp = sum(g == t == c for g, t in zip(guesses, truth, strict=True))
        fp = sum(g == c != t for g, t in zip(guesses, truth, strict=True))
        fn = sum(t == c != g for g, t in zip(guesses, truth, strict=True))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    assert metrics["eval_accuracy"] == pytest.approx(sum(map(int.__eq__, guesses, truth)) / 9)
    assert metrics["eval_macro_f1"] == pytest.approx(sum(f1s) / len(f1s))
