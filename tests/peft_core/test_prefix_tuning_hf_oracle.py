"""HF PEFT as the oracle: each side loads the other's saved prefix with the same logits.

HF PEFT 0.21.2 looks for a `past_key_values` parameter in a sequence classifier's forward,
which transformers 5 renamed `cache`, so its own forward refuses prefix tuning there.
`hf_prefix_logits` does what its `_prefix_tuning_forward` does, with HF PEFT's own prefix
(`get_prompt`) as the cache; for causal LMs it is checked against HF PEFT's forward.
"""

import peft
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import peft_core
from peft_core.prefix_tuning import PrefixTuningConfig
from peft_core.tiny import build_tiny
from tests.peft_core.method_cases import ARCHITECTURES
from tests.peft_core.test_lora_hf_oracle import (
    ATOL,
    HF_TASK,
    assert_hf_state_is_on_disk,
    logits,
    perturb,
)
from tests.peft_core.test_prompt_tuning_hf_oracle import left_padding

P, H = 4, 16
CASES = [(kind, task, h) for kind, task in ARCHITECTURES for h in (None, H)]


@torch.no_grad()
def hf_prefix_logits(
    theirs: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """HF PEFT's prefix-tuning forward: its prefix as the past, the mask grown by p ones."""
    theirs.eval()
    base = theirs.get_base_model()
    cache = theirs.get_prompt(input_ids.shape[0])
    if mask is not None:
        mask = torch.cat([torch.ones(mask.shape[0], P, dtype=mask.dtype), mask], dim=1)
    if hasattr(base, "bert"):  # no `cache` parameter: HF PEFT runs the backbone, then the head
        pooled = base.bert(input_ids, attention_mask=mask, cache=cache).pooler_output
        return base.classifier(base.dropout(pooled))
    return base(input_ids=input_ids, attention_mask=mask, cache=cache).logits


def hf_logits(theirs: nn.Module, task: str, input_ids: torch.Tensor, mask=None) -> torch.Tensor:
    """HF PEFT's own forward where it works (causal LMs), checked against the mirror."""
    mirrored = hf_prefix_logits(theirs, input_ids, mask)
    if task == "causal-lm":
        with torch.no_grad():
            own = theirs(input_ids=input_ids, attention_mask=mask).logits
        assert_close(mirrored, own, atol=1e-6, rtol=0)
    return mirrored


@pytest.mark.parametrize(("kind", "task", "h"), CASES)
def test_peft_core_prefix_loads_in_hf_peft(kind, task, h, input_ids, tmp_path):
    torch.manual_seed(0)
    config = PrefixTuningConfig(num_virtual_tokens=P, projection_dim=h)
    model = peft_core.apply(build_tiny(kind, task), config)
    perturb(model)
    ours = logits(model, input_ids)
    assert not torch.allclose(ours, logits(build_tiny(kind, task), input_ids), atol=1e-3)
    peft_core.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build_tiny(kind, task), tmp_path)
    assert_close(hf_logits(theirs, task, input_ids), ours, atol=ATOL, rtol=0)
    mask = left_padding(input_ids)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask).logits
    assert_close(hf_logits(theirs, task, input_ids, mask), expected, atol=ATOL, rtol=0)
    assert_hf_state_is_on_disk(theirs, tmp_path)


@pytest.mark.parametrize(("kind", "task", "h"), CASES)
def test_hf_peft_prefix_loads_in_peft_core(kind, task, h, input_ids, tmp_path):
    projection = {"prefix_projection": True, "encoder_hidden_size": h} if h else {}
    hf_config = peft.PrefixTuningConfig(task_type=HF_TASK[task], num_virtual_tokens=P, **projection)
    theirs = peft.get_peft_model(build_tiny(kind, task), hf_config)
    perturb(theirs)
    expected = hf_logits(theirs, task, input_ids)
    theirs.save_pretrained(tmp_path)
    model = peft_core.load_adapter(build_tiny(kind, task), tmp_path)
    assert_close(logits(model, input_ids), expected, atol=ATOL, rtol=0)
    if h is None:  # with the MLP, HF PEFT counts it; a loaded adapter is the table alone
        assert peft_core.trainable_parameters(model) == theirs.get_nb_trainable_parameters()[0]
