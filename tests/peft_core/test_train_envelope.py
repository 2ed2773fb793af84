"""The training envelope TRL and Axolotl users know: schedules, gradient accumulation,
gradient checkpointing, bf16/fp16 with fp32 adapter weights, early stopping, the attention
kernel; the same seed and settings give the same adapter bytes on CPU."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import peft_core
from peft_core import LoraConfig, catalogue
from peft_core.cli import main
from peft_core.configs import ConfigError
from peft_core.samples import sample_rows
from peft_core.train import TrainConfig, _Loop, train
from tests.peft_core.test_train import Recorder

SHORT = {"steps": 3, "batch_size": 2, "learning_rate": 1e-3, "max_length": 48, "eval_batches": 1}


@pytest.fixture(scope="module")
def rows():
    train_rows, val_rows = sample_rows("sample-instructions")
    return train_rows[:64], val_rows[:8]


@pytest.fixture(scope="module")
def sentiment():
    train_rows, val_rows = sample_rows("sample-sentiment")
    return train_rows[:64], val_rows[:8]


def _lora(model_cache, task="causal-lm", dtype=torch.float32, dropout=0.0, **load):
    model, tokenizer = catalogue.load_model("tiny-llama", task, cache_dir=model_cache, **load)
    model = model.to(dtype)
    torch.manual_seed(0)
    config = LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear")
    return peft_core.apply(model, config), tokenizer


def _train(model, tokenizer, rows, task="causal-lm", callbacks=None, **config):
    train_rows, val_rows = rows
    return train(
        model, tokenizer, task=task, train_rows=train_rows, val_rows=val_rows,
        config=TrainConfig(**(SHORT | config)), callbacks=callbacks,
    )  # fmt: skip


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
        ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                    0.5 * (1 + math.cos(0.75 * math.pi))]),
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)  # fmt: skip
def test_the_schedules_after_warmup(model_cache, schedule, expected):
    model, tokenizer = _lora(model_cache)
    config = TrainConfig(steps=6, warmup_steps=2, schedule=schedule)
    loop = _Loop(model, tokenizer, config, Recorder())
    assert [loop._lr_factor(step) for step in range(6)] == pytest.approx(expected)


def test_accumulated_micro_batches_step_like_one_big_batch(model_cache, sentiment):
    """Two micro-batches of 2 rows give the update one batch of 4 gives (seq-cls: a mean
    over rows either way), on the same rows in the same order."""
    results = []
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        model, tokenizer = _lora(model_cache, "seq-cls")
        _train(model, tokenizer, sentiment, "seq-cls", batch_size=batch_size,
               grad_accum=grad_accum, steps=2)  # fmt: skip
        results.append(_adapter(model))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_trains_the_same_adapter(model_cache, rows):
    results = []
    for checkpointing in (False, True):
        model, tokenizer = _lora(model_cache)
        _train(model, tokenizer, rows, gradient_checkpointing=checkpointing)
        assert model.is_gradient_checkpointing is checkpointing
        results.append(_adapter(model))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_trains_fp32_adapter_weights_on_a_half_base(model_cache, rows, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model, tokenizer = _lora(model_cache, dtype=dtype, dropout=0.05)
    before = _adapter(model)
    result = _train(model, tokenizer, rows, precision=precision, steps=4)
    assert math.isfinite(result.metrics["train_loss"]) and math.isfinite(
        result.metrics["eval_loss"]
    )
    after = _adapter(model)
    assert {t.dtype for t in after.values()} == {torch.float32}  # the master copy
    assert any(not torch.equal(before[n], after[n]) for n in after)
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == dtype


def test_early_stopping_ends_after_patience_evaluations_without_gain(model_cache, rows):
    model, tokenizer = _lora(model_cache)
    recorder = Recorder()
    result = _train(
        model, tokenizer, rows, callbacks=recorder, steps=20, eval_every=1,
        early_stop_patience=2, learning_rate=1e-12, schedule="constant",
    )  # fmt: skip
    assert result.early_stopped and result.steps_done == 3  # best at 1, then 2 without gain
    assert [step for step, _ in recorder.evals] == [1, 2, 3]
    assert any("stopped early at step 3" in line for line in recorder.lines)


def test_the_config_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match="early_stop_patience needs eval_every"):
        TrainConfig(early_stop_patience=2)
    with pytest.raises(ConfigError, match="schedule must be one of linear, cosine, constant"):
        TrainConfig(schedule="exponential")
    with pytest.raises(ConfigError, match="grad_accum"):
        TrainConfig(grad_accum=0)


def test_the_attention_kernel_is_switched_and_flash_needs_its_package(model_cache, rows):
    model, tokenizer = _lora(model_cache)
    _train(model, tokenizer, rows, attn="eager", steps=1)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="flash-attn"):
        _train(*_lora(model_cache), rows, attn="flash", steps=1)


CLI = ["train", "--model", "tiny-llama", "--dataset", "sample-instructions", "--method", "lora"]
CLI += ["--precision", "bf16", "--grad-accum", "2", "--gradient-checkpointing"]
CLI += ["--schedule", "cosine", "--warmup-steps", "1", "--seed", "3", "--steps", "3"]
CLI += ["--quantize", "nf4"]
CLI += ["--batch-size", "2", "--max-length", "48"]


def test_the_cli_trains_with_the_envelope_reproducibly_and_hf_peft_loads_it(tmp_path, model_cache):
    from peft import PeftModel

    outputs = [tmp_path / "first", tmp_path / "second"]
    for out in outputs:
        assert main([*CLI, "--output", str(out), "--cache-dir", str(model_cache)]) == 0
    first, second = (out / "adapter_model.safetensors" for out in outputs)
    assert first.read_bytes() == second.read_bytes()  # same seed, same settings: same bytes
    tensors = load_file(first)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert max(float(t.abs().max()) for k, t in tensors.items() if "lora_B" in k) > 0  # learned
    assert json.loads((outputs[0] / "adapter_config.json").read_text())["lora_dropout"] == 0.05

    base, _ = catalogue.load_model("tiny-llama", "causal-lm", cache_dir=model_cache)
    ours = peft_core.load_adapter(
        catalogue.load_model("tiny-llama", "causal-lm", cache_dir=model_cache)[0], outputs[0]
    )
    theirs = PeftModel.from_pretrained(base, outputs[0])
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        gap = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max()
    assert gap <= 1e-5


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_a_quantised_base_trains_lora_after_an_eval_mode_forward(model_cache, rows, quantize):
    """bitsandbytes repacks a 4-bit weight for CPU inference on an eval-mode forward, after
    which no gradient reaches the layers below: the base evaluation before training must not
    leave the adapter unable to learn."""
    from peft_core.pretrained import load_directory

    directory = catalogue.model_dir("tiny-llama", cache_dir=model_cache)
    model, tokenizer = load_directory(directory, "causal-lm", dtype="bfloat16", quantize=quantize)
    assert model.is_quantized
    peft_core.apply(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        model.eval()(input_ids=torch.tensor([[1, 40, 41]]))  # as the base evaluation does
    _train(model, tokenizer, rows, precision="bf16", learning_rate=1e-2)
    grads_reached = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(float(p.abs().max()) > 0 for p in grads_reached)


def test_methods_that_cannot_sit_on_a_quantised_base_are_refused(tmp_path, model_cache, capsys):
    cli = [*CLI[:6], "bottleneck", *CLI[7:]]
    args = [*cli, "--output", str(tmp_path), "--cache-dir", str(model_cache)]
    with pytest.raises(SystemExit):
        main(args)
    assert "bottleneck cannot train on a nf4 base: PEFT Lab has not" in capsys.readouterr().err
    assert not (tmp_path / "adapter_model.safetensors").exists()
