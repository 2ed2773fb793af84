"""HF PEFT as the oracle on every family: our saved LoRA, DoRA, (IA)³, prompt and prefix
adapters load in `peft.PeftModel.from_pretrained` with our logits (and, for prompt and
prefix tuning, with a left-padded batch too; OPT's prefix excepted, see below).

Our adapter_config.json names the modules structure.py found, so HF PEFT needs no default
table of its own (it has none for Phi-3 or Starcoder2). HF PEFT's prefix-tuning forward on a
sequence classifier breaks under transformers 5 (test_prefix_tuning_hf_oracle.py): for the
encoders, `hf_prefix_logits` runs its body with HF PEFT's own prefix as the cache, then the
head. DeBERTa-v2 is left out of prefix tuning: we refuse it (test_families.py).
OPT numbers positions from the attention mask (a running count of real tokens); with no
position_ids given, our prefix numbers a left-padded row's real tokens from p + its padding,
HF PEFT's from p, so the padded comparison is skipped there (generate() and our right-padded
training batches pass or need no position_ids, and agree).
"""

import peft
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import peft_core
from peft_core.configs import (
    DoraConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from tests.peft_core.families import FAMILY_CASES, fresh
from tests.peft_core.test_lora_hf_oracle import ATOL, assert_hf_state_is_on_disk, logits, perturb
from tests.peft_core.test_prompt_tuning_hf_oracle import left_padding, real_logits

P = 4
CONFIGS = {
    "lora": lambda: LoraConfig(r=4, alpha=8.0, dropout=0.0),
    "dora": lambda: DoraConfig(r=4, alpha=8.0, dropout=0.0),
    "ia3": lambda: IA3Config(),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=P),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=P),
}
CASES = [
    pytest.param(method, kind, task, id=f"{method}-{kind}")
    for method in CONFIGS
    for kind, task in FAMILY_CASES
    if not (method == "prefix" and kind == "deberta-v2")
]
PADDED_PREFIX_DIFFERS = ("opt",)


@torch.no_grad()
def hf_prefix_logits(theirs: nn.Module, input_ids: torch.Tensor, mask=None) -> torch.Tensor:
    """HF PEFT's own forward for a causal LM; an encoder's body with HF PEFT's prefix as its
    cache (the mask grown by p ones), then its head."""
    theirs.eval()
    base = theirs.get_base_model()
    if getattr(base, "get_output_embeddings", lambda: None)() is not None:
        return theirs(input_ids=input_ids, attention_mask=mask).logits
    if mask is not None:
        mask = torch.cat([torch.ones(mask.shape[0], P, dtype=mask.dtype), mask], dim=1)
    body = base.base_model
    out = body(input_ids, attention_mask=mask, cache=theirs.get_prompt(input_ids.shape[0]))
    if hasattr(base, "bert"):  # BERT's head reads the pooler
        return base.classifier(base.dropout(out.pooler_output))
    return base.classifier(out.last_hidden_state)  # RoBERTa's head pools position 0 itself


def hf_logits(theirs: nn.Module, method: str, input_ids: torch.Tensor, mask=None):
    if method == "prefix":
        return hf_prefix_logits(theirs, input_ids, mask)
    return real_logits(theirs, input_ids, mask)  # a causal LM's real tokens only


@pytest.mark.parametrize(("method", "kind", "task"), CASES)
def test_our_adapter_loads_in_hf_peft_with_our_logits(method, kind, task, input_ids, tmp_path):
    torch.manual_seed(0)
    model = peft_core.apply(fresh(kind, task), CONFIGS[method]())
    perturb(model)
    ours = logits(model, input_ids)
    assert not torch.allclose(ours, logits(fresh(kind, task), input_ids), atol=1e-3)
    peft_core.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh(kind, task), tmp_path)
    assert_close(hf_logits(theirs, method, input_ids), ours, atol=ATOL, rtol=0)
    assert_hf_state_is_on_disk(theirs, tmp_path)
    if method in ("prompt", "prefix") and not (
        method == "prefix" and kind in PADDED_PREFIX_DIFFERS
    ):
        mask = left_padding(input_ids)
        with torch.no_grad():
            expected = model(input_ids=input_ids, attention_mask=mask).logits
        assert_close(hf_logits(theirs, method, input_ids, mask), expected, atol=ATOL, rtol=0)
