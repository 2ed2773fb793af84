"""Every method, trained for a fixed budget on the built-in data, beats the untrained base
model on the validation split: causal LM on sample-instructions (tiny Llama) and
classification on sample-sentiment (the real MiniLM encoder: a random tiny BERT cannot
read sentiment from bytes in a few dozen steps, whatever the method)."""

import pytest
import torch

import peft_core
from peft_core import catalogue
from peft_core.samples import sample_rows
from peft_core.train import TrainConfig, evaluate, train
from tests.peft_core.method_cases import CASES

pytestmark = pytest.mark.slow

SETUPS = {  # (kind, task): (model, dataset, budget)
    ("llama", "causal-lm"): (
        "tiny-llama",
        "sample-instructions",
        TrainConfig(steps=40, batch_size=8, learning_rate=1e-2, max_length=64, eval_batches=8),
    ),
    ("bert", "seq-cls"): (
        "all-minilm-l6-v2",
        "sample-sentiment",
        TrainConfig(steps=80, batch_size=8, learning_rate=2e-3, max_length=64, eval_batches=8),
    ),
}
PARAMS = [
    pytest.param(case, kind, task, id=f"{case.id}-{kind}-{task}")
    for case in CASES
    for kind, task in SETUPS
    if (kind, task) in case.architectures
]


@pytest.mark.parametrize(("case", "kind", "task"), PARAMS)
def test_trained_adapter_beats_the_base_model(case, kind, task, model_cache):
    model_key, dataset, budget = SETUPS[(kind, task)]
    train_rows, val_rows = sample_rows(dataset)
    model, tokenizer = catalogue.load_model(model_key, task, cache_dir=model_cache)
    torch.manual_seed(0)
    model = peft_core.apply(model, case.config(kind, task))
    rows = {"task": task, "rows": val_rows[:64], "config": budget}
    with peft_core.disabled(model):
        base = evaluate(model, tokenizer, **rows)["eval_loss"]
    train(
        model,
        tokenizer,
        task=task,
        train_rows=train_rows,
        val_rows=val_rows[:64],
        config=budget,
    )
    trained = evaluate(model, tokenizer, **rows)["eval_loss"]
    assert trained < base, f"{case.id}: eval loss {trained:.4f} did not beat base {base:.4f}"
