"""HF PEFT as the oracle for (IA)³: each side loads the other's saved adapter with the same
logits, the same vectors and the same trainable count; merged weights agree."""

import peft
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import peft_core
from peft_core.ia3 import IA3Config, IA3Linear
from peft_core.tiny import build_tiny
from tests.peft_core.test_lora_hf_oracle import (
    ATOL,
    HF_TASK,
    assert_hf_state_is_on_disk,
    logits,
    perturb,
)

# (kind, task, target_modules, feedforward_modules); None: the architecture's defaults
CASES = [
    ("llama", "causal-lm", None, None),
    ("llama", "causal-lm", ["q_proj", "v_proj", "up_proj"], ["up_proj"]),
    ("gpt2", "causal-lm", None, None),
    ("llama", "seq-cls", None, None),
    ("bert", "seq-cls", None, None),
]


@pytest.mark.parametrize("kind,task,target,feedforward", CASES)
def test_peft_core_ia3_loads_in_hf_peft(kind, task, target, feedforward, input_ids, tmp_path):
    config = IA3Config(target_modules=target, feedforward_modules=feedforward)
    model = peft_core.apply(build_tiny(kind, task), config)
    perturb(model)
    ours = logits(model, input_ids)
    assert not torch.allclose(ours, logits(build_tiny(kind, task), input_ids), atol=1e-3)
    peft_core.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build_tiny(kind, task), tmp_path)
    assert_close(logits(theirs, input_ids), ours, atol=ATOL, rtol=0)
    assert_hf_state_is_on_disk(theirs, tmp_path)


@pytest.mark.parametrize("kind,task,target,feedforward", CASES)
def test_hf_peft_ia3_loads_in_peft_core(kind, task, target, feedforward, input_ids, tmp_path):
    hf_config = peft.IA3Config(
        task_type=HF_TASK[task],
        target_modules=target,
        feedforward_modules=feedforward,
        fan_in_fan_out=kind == "gpt2",
    )
    theirs = peft.get_peft_model(build_tiny(kind, task), hf_config)
    perturb(theirs)
    expected = logits(theirs, input_ids)
    assert not torch.allclose(expected, logits(build_tiny(kind, task), input_ids), atol=1e-3)
    theirs.save_pretrained(tmp_path)
    model = peft_core.load_adapter(build_tiny(kind, task), tmp_path)
    assert_close(logits(model, input_ids), expected, atol=ATOL, rtol=0)
    assert peft_core.trainable_parameters(model) == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("kind,task", [("gpt2", "causal-lm"), ("bert", "seq-cls")])
def test_merged_weights_match_hf_peft_merge_and_unload(kind, task, tmp_path):
    model = peft_core.apply(build_tiny(kind, task), IA3Config())
    perturb(model)
    peft_core.save_adapter(model, tmp_path)
    merged = peft.PeftModel.from_pretrained(build_tiny(kind, task), tmp_path).merge_and_unload()
    peft_core.merge(model)
    assert_merged_like(model, merged, IA3Linear)


def assert_merged_like(model: nn.Module, merged: nn.Module, layer_type: type) -> None:
    """Every adapted layer's merged weight and bias equal HF PEFT's merge_and_unload ones."""
    paths = [path for path, m in model.named_modules() if isinstance(m, layer_type)]
    assert paths
    for path in paths:
        ours, theirs = model.get_submodule(path).base_layer, merged.get_submodule(path)
        assert_close(ours.weight, theirs.weight, atol=1e-6, rtol=0)
        assert_close(ours.bias, theirs.bias, atol=1e-6, rtol=0)
