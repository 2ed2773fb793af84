"""HF PEFT as the oracle: each side loads the other's saved soft prompt with the same logits.

HF PEFT's causal LMs return logits for the virtual tokens too; only the real tokens' are
compared. Its BERT classifier pools the first virtual token, and so does ours.
"""

import peft
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import peft_core
from peft_core.prompt_tuning import PromptTuningConfig
from peft_core.tiny import build_tiny
from tests.peft_core.method_cases import ARCHITECTURES
from tests.peft_core.test_lora_hf_oracle import (
    ATOL,
    HF_TASK,
    assert_hf_state_is_on_disk,
    logits,
    perturb,
)

P = 4


def real_logits(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None = None):
    """Logits of the real tokens (a causal LM's last n positions; a classifier's as they are)."""
    with torch.no_grad():
        out = model.eval()(input_ids=input_ids, attention_mask=mask).logits
    return out[:, -input_ids.shape[1] :] if out.ndim == 3 else out


def left_padding(input_ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    return mask


@pytest.mark.parametrize(("kind", "task"), ARCHITECTURES)
def test_peft_core_prompt_loads_in_hf_peft(kind, task, input_ids, tmp_path):
    torch.manual_seed(0)
    model = peft_core.apply(build_tiny(kind, task), PromptTuningConfig(num_virtual_tokens=P))
    perturb(model)
    ours = logits(model, input_ids)
    assert not torch.allclose(ours, logits(build_tiny(kind, task), input_ids), atol=1e-3)
    peft_core.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build_tiny(kind, task), tmp_path)
    assert_close(real_logits(theirs, input_ids), ours, atol=ATOL, rtol=0)
    mask = left_padding(input_ids)
    expected = real_logits(model, input_ids, mask)
    assert_close(real_logits(theirs, input_ids, mask), expected, atol=ATOL, rtol=0)
    assert_hf_state_is_on_disk(theirs, tmp_path)


@pytest.mark.parametrize(("kind", "task"), ARCHITECTURES)
def test_hf_peft_prompt_loads_in_peft_core(kind, task, input_ids, tmp_path):
    init = "SAMPLE_VOCAB" if kind == "gpt2" else "RANDOM"
    hf_config = peft.PromptTuningConfig(
        task_type=HF_TASK[task], num_virtual_tokens=P, prompt_tuning_init=init
    )
    theirs = peft.get_peft_model(build_tiny(kind, task), hf_config)
    perturb(theirs)
    expected = real_logits(theirs, input_ids)
    theirs.save_pretrained(tmp_path)
    model = peft_core.load_adapter(build_tiny(kind, task), tmp_path)
    assert_close(logits(model, input_ids), expected, atol=ATOL, rtol=0)
    assert peft_core.trainable_parameters(model) == theirs.get_nb_trainable_parameters()[0]


def test_disabling_agrees_with_hf_peft(input_ids, tmp_path):
    # (HF PEFT 0.21.2's disable_adapter breaks on a prompt-tuned classifier: a causal LM here)
    model = peft_core.apply(build_tiny("gpt2"), PromptTuningConfig(num_virtual_tokens=P))
    perturb(model)
    peft_core.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build_tiny("gpt2"), tmp_path)
    with theirs.disable_adapter(), peft_core.disabled(model):
        assert_close(logits(theirs, input_ids), logits(model, input_ids), atol=ATOL, rtol=0)
