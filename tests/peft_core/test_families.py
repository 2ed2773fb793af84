"""Every method on every family: the places come from structure.py, the battery is shared.

For each family of families.FAMILY_CASES (peft_core.tiny.FAMILIES and the unlisted
Starcoder2) and each method (method_cases.py's cases for LoRA, DoRA, (IA)³, prompt tuning,
prefix tuning, the three bottleneck placements and MAM): identity at init where the math
says so, one optimizer step gives a finite loss and changes adapter parameters only, and
save -> load into a fresh model gives the same logits. DeBERTa-v2's attention keeps no KV
cache, so prefix tuning and MAM are refused there, by reason.
"""

import pytest
import torch
from torch.testing import assert_close

import peft_core
from tests.peft_core.families import FAMILY_CASES, fresh
from tests.peft_core.method_cases import CASES
from tests.peft_core.test_lora import logits, loss_of

METHOD_IDS = (
    "lora-qv",
    "dora-qv",
    "ia3",
    "prompt-random",
    "prefix",
    "bottleneck-houlsby",
    "bottleneck-pfeiffer",
    "bottleneck-parallel",
    "mam",
)
METHODS = [case for case in CASES if case.id in METHOD_IDS]
NEEDS_KV_CACHE = ("prefix", "mam")
NO_KV_CACHE = ("deberta-v2",)


def _one_step_changes_only_adapter_params(model, input_ids, task) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    loss = loss_of(model, input_ids, task)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("kind", "task"), FAMILY_CASES)
@pytest.mark.parametrize("case", METHODS, ids=[case.id for case in METHODS])
def test_method_on_family(case, kind, task, input_ids, tmp_path):
    config = case.config(kind, task)
    if kind in NO_KV_CACHE and case.id in NEEDS_KV_CACHE:
        with pytest.raises(ValueError, match=r"never calls cache\.update"):
            peft_core.apply(fresh(kind, task), config)
        return
    base = logits(fresh(kind, task), input_ids)
    torch.manual_seed(0)
    model = peft_core.apply(fresh(kind, task), config)
    adapted = logits(model, input_ids)
    if case.identity_at_init:
        assert_close(adapted, base, atol=1e-5, rtol=0)
    _one_step_changes_only_adapter_params(model, input_ids, task)
    expected = logits(model, input_ids)
    assert not torch.allclose(expected, adapted, atol=1e-6)
    peft_core.save_adapter(model, tmp_path)
    loaded = peft_core.load_adapter(fresh(kind, task), tmp_path).eval()
    assert_close(logits(loaded, input_ids), expected, atol=1e-5, rtol=0)
