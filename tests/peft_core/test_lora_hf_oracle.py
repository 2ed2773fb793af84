"""HF PEFT as the oracle: each side loads the other's saved LoRA with the same logits."""

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

import peft_core
from peft_core.lora import LoraConfig
from peft_core.tiny import build_tiny

CASES = [
    ("llama", "causal-lm", None),
    ("llama", "causal-lm", "all-linear"),
    ("llama", "causal-lm", r"model\.layers\.0\.self_attn\.(q|v)_proj"),
    ("gpt2", "causal-lm", None),
    ("gpt2", "causal-lm", "all-linear"),
    ("llama", "seq-cls", None),
    ("bert", "seq-cls", None),
    ("bert", "seq-cls", "all-linear"),
]
HF_TASK = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS"}
ATOL = 1e-4


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids).logits


def perturb(model: nn.Module, seed: int = 2) -> None:
    """Move every trainable tensor (lora_A, lora_B, the head copy) away from its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def assert_hf_state_is_on_disk(theirs, directory) -> None:
    """What HF PEFT loaded is, key for key and bit for bit, what we wrote (it only warns on
    missing LoRA keys, so equal logits alone could hide a dropped tensor)."""
    on_disk = load_file(directory / "adapter_model.safetensors")
    loaded = peft.get_peft_model_state_dict(theirs)
    assert loaded.keys() == on_disk.keys()
    assert all(torch.equal(loaded[k], on_disk[k]) for k in on_disk)


@pytest.mark.parametrize("kind,task,target", CASES)
def test_peft_core_adapter_loads_in_hf_peft(kind, task, target, input_ids, tmp_path):
    config = LoraConfig(r=4, alpha=8.0, target_modules=target, use_rslora=target == "all-linear")
    model = peft_core.apply(build_tiny(kind, task), config)
    perturb(model)
    ours = logits(model, input_ids)
    assert not torch.allclose(ours, logits(build_tiny(kind, task), input_ids), atol=1e-3)
    peft_core.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build_tiny(kind, task), tmp_path)
    assert_close(logits(theirs, input_ids), ours, atol=ATOL, rtol=0)
    assert_hf_state_is_on_disk(theirs, tmp_path)


@pytest.mark.parametrize("kind,task,target", CASES)
def test_hf_peft_adapter_loads_in_peft_core(kind, task, target, input_ids, tmp_path):
    hf_config = peft.LoraConfig(
        task_type=HF_TASK[task],
        r=4,
        lora_alpha=8,
        target_modules=target,
        fan_in_fan_out=kind == "gpt2",
        use_rslora=target == "all-linear",
    )
    theirs = peft.get_peft_model(build_tiny(kind, task), hf_config)
    perturb(theirs)
    expected = logits(theirs, input_ids)
    assert not torch.allclose(expected, logits(build_tiny(kind, task), input_ids), atol=1e-3)
    theirs.save_pretrained(tmp_path)
    model = peft_core.load_adapter(build_tiny(kind, task), tmp_path)
    assert_close(logits(model, input_ids), expected, atol=ATOL, rtol=0)
    assert peft_core.trainable_parameters(model) == theirs.get_nb_trainable_parameters()[0]


def test_explicit_modules_to_save_and_disabling_agree_with_hf_peft(input_ids, tmp_path):
    config = LoraConfig(r=4, dropout=0.1, modules_to_save=("lm_head",))
    model = peft_core.apply(build_tiny("llama"), config)
    perturb(model)
    peft_core.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build_tiny("llama"), tmp_path)
    assert theirs.peft_config["default"].lora_dropout == 0.1
    assert_close(logits(theirs, input_ids), logits(model, input_ids), atol=ATOL, rtol=0)
    with theirs.disable_adapter(), peft_core.disabled(model):
        assert_close(logits(theirs, input_ids), logits(model, input_ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_an_adapter_whose_init_rewrote_the_base_is_refused_by_name(tmp_path, init):
    """HF PEFT saves a PiSSA or OLoRA adapter for the base it rewrote (W0 - B·A), not for
    the original one: loaded onto the original base it answers wrongly, so it is refused."""
    torch.manual_seed(0)
    base = build_tiny("llama", "causal-lm")
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, task_type="CAUSAL_LM")
    peft.get_peft_model(base, config).save_pretrained(tmp_path)
    fresh = build_tiny("llama", "causal-lm")
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}', which rewrites the base"):
        peft_core.load_adapter(fresh, tmp_path)


@pytest.mark.parametrize("init", [False, "gaussian"])
def test_an_init_only_option_loads_with_hf_peft_logits(tmp_path, init):
    torch.manual_seed(0)
    base = build_tiny("llama", "causal-lm")
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(base, config)
    theirs.save_pretrained(tmp_path)
    ours = peft_core.load_adapter(build_tiny("llama", "causal-lm"), tmp_path)
    ids = torch.randint(0, 100, (2, 9))
    assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=0)
