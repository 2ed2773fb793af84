"""HF PEFT as the oracle for DoRA (its LoRA with use_dora=True): adapters load both ways with the
same logits, and training-mode outputs, gradients and merged weights agree."""

import peft
import pytest
import torch
from torch.testing import assert_close

import peft_core
from peft_core.dora import DoraConfig, DoraLinear
from peft_core.tiny import build_tiny
from tests.peft_core.test_ia3_hf_oracle import assert_merged_like
from tests.peft_core.test_lora_hf_oracle import (
    ATOL,
    HF_TASK,
    assert_hf_state_is_on_disk,
    logits,
    perturb,
)

CASES = [
    ("llama", "causal-lm", None),
    ("llama", "causal-lm", "all-linear"),
    ("gpt2", "causal-lm", None),
    ("gpt2", "causal-lm", "all-linear"),
    ("bert", "seq-cls", None),
]


def hf_dora(kind: str, task: str, target, dropout: float = 0.0) -> peft.PeftModel:
    config = peft.LoraConfig(
        task_type=HF_TASK[task],
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules=target,
        fan_in_fan_out=kind == "gpt2",
        use_rslora=target == "all-linear",
        use_dora=True,
    )
    return peft.get_peft_model(build_tiny(kind, task), config)


def ours_dora(kind: str, task: str, target, dropout: float = 0.0):
    config = DoraConfig(
        r=4, alpha=8.0, dropout=dropout, target_modules=target, use_rslora=target == "all-linear"
    )
    return peft_core.apply(build_tiny(kind, task), config)


@pytest.mark.parametrize("kind,task,target", CASES)
def test_peft_core_dora_loads_in_hf_peft(kind, task, target, input_ids, tmp_path):
    model = ours_dora(kind, task, target)
    perturb(model)
    ours = logits(model, input_ids)
    assert not torch.allclose(ours, logits(build_tiny(kind, task), input_ids), atol=1e-3)
    peft_core.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build_tiny(kind, task), tmp_path)
    assert theirs.peft_config["default"].use_dora
    assert_close(logits(theirs, input_ids), ours, atol=ATOL, rtol=0)
    assert_hf_state_is_on_disk(theirs, tmp_path)


@pytest.mark.parametrize("kind,task,target", CASES)
def test_hf_peft_dora_loads_in_peft_core(kind, task, target, input_ids, tmp_path):
    theirs = hf_dora(kind, task, target)
    perturb(theirs)
    expected = logits(theirs, input_ids)
    assert not torch.allclose(expected, logits(build_tiny(kind, task), input_ids), atol=1e-3)
    theirs.save_pretrained(tmp_path)
    model = peft_core.load_adapter(build_tiny(kind, task), tmp_path)
    assert type(model.peft_core_config) is DoraConfig
    assert_close(logits(model, input_ids), expected, atol=ATOL, rtol=0)
    assert peft_core.trainable_parameters(model) == theirs.get_nb_trainable_parameters()[0]


def _load_both(tmp_path, dropout: float = 0.0):
    """HF PEFT's perturbed llama DoRA, and ours loaded from its saved directory."""
    theirs = hf_dora("llama", "causal-lm", None, dropout)
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    return theirs, peft_core.load_adapter(build_tiny("llama"), tmp_path)


def test_training_with_dropout_matches_hf_peft(input_ids, tmp_path):
    """Same seed, same dropout masks: HF PEFT's extra W0·x̃ term is reproduced."""
    theirs, ours = _load_both(tmp_path, dropout=0.3)
    outputs = []
    for model in (theirs.train(), ours.train()):
        torch.manual_seed(3)
        outputs.append(model(input_ids).logits.detach())
    assert_close(outputs[1], outputs[0], atol=ATOL, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(outputs[1], ours.eval()(input_ids).logits, atol=1e-3)


def _grads(model) -> dict[str, torch.Tensor]:
    """Gradients of the trainable tensors, by our in-memory name (HF's adapter name dropped)."""
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            name = name.removeprefix("base_model.model.").replace(".default", "")
            grads[name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = (
                param.grad
            )
    return grads


def test_gradients_match_hf_peft(input_ids, tmp_path):
    """The norm is detached on both sides, so m, A and B get the same gradients."""
    theirs, ours = _load_both(tmp_path)
    for model in (theirs.eval(), ours.eval()):
        model(input_ids, labels=input_ids).loss.backward()
    theirs_grads, ours_grads = _grads(theirs), _grads(ours)
    assert ours_grads.keys() == theirs_grads.keys()
    for name, grad in ours_grads.items():
        assert_close(grad, theirs_grads[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind,task", [("llama", "causal-lm"), ("gpt2", "causal-lm")])
def test_merged_weights_match_hf_peft_merge_and_unload(kind, task, tmp_path):
    model = ours_dora(kind, task, None)
    perturb(model)
    peft_core.save_adapter(model, tmp_path)
    merged = peft.PeftModel.from_pretrained(build_tiny(kind, task), tmp_path).merge_and_unload()
    peft_core.merge(model)
    assert_merged_like(model, merged, DoraLinear)
