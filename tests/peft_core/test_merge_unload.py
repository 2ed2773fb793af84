"""merge_and_unload: the adapter folded into the base weights, every wrapper gone, the plain
transformers model left; it saves as safetensors and loads without peft_core, giving the
adapted model's outputs. Non-mergeable methods are refused and left as they were."""

import pytest
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import peft_core
from peft_core.model import TrainedCopy, merge_and_unload
from peft_core.tiny import build_tiny
from tests.peft_core.method_cases import CASES
from tests.peft_core.test_battery import _adapted, _logits
from tests.peft_core.test_lora import perturb

MERGEABLE = [
    pytest.param(case, kind, task, id=f"{case.id}-{kind}-{task}")
    for case in CASES
    if case.mergeable
    for kind, task in case.architectures
]
REFUSED = [pytest.param(case, id=case.id) for case in CASES if not case.mergeable]
AUTO = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification}


@pytest.mark.parametrize(("case", "kind", "task"), MERGEABLE)
def test_unloaded_model_is_the_plain_model_with_the_adapters_outputs(case, kind, task, input_ids):
    model = _adapted(case, kind, task)
    perturb(model)
    expected = _logits(model.eval(), input_ids)
    plain = merge_and_unload(model)
    assert_close(_logits(plain, input_ids), expected, atol=1e-5, rtol=1e-4)
    assert set(plain.state_dict()) == set(build_tiny(kind, task).state_dict())
    assert not hasattr(plain, peft_core.model.CONFIG_ATTR)
    assert not any(isinstance(m, TrainedCopy) for m in plain.modules())
    layer_types = peft_core.model.method_for_config(case.config(kind, task)).layer_types
    assert not any(isinstance(m, layer_types) for m in plain.modules())


@pytest.mark.parametrize(
    ("kind", "task"), [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("bert", "seq-cls")]
)
def test_saved_safetensors_load_in_transformers_with_the_same_logits(
    kind, task, input_ids, tmp_path
):
    case = next(c for c in CASES if c.id == "lora-qv")
    model = _adapted(case, kind, task)
    perturb(model)
    expected = _logits(model.eval(), input_ids)
    merge_and_unload(model).save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AUTO[task].from_pretrained(tmp_path, local_files_only=True).eval()
    assert_close(_logits(loaded, input_ids), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", REFUSED)
def test_non_mergeable_methods_are_refused_and_left_alone(case, input_ids):
    kind, task = case.architectures[0]
    model = _adapted(case, kind, task)
    perturb(model)
    expected = _logits(model.eval(), input_ids)
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_and_unload(model)
    assert hasattr(model, peft_core.model.CONFIG_ATTR)
    assert_close(_logits(model, input_ids), expected, atol=0, rtol=0)
