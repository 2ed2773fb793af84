"""The saved directory (HF PEFT layout) and the errors of the public API."""

import dataclasses
import json
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file

import peft_core
from peft_core import model as peft_model
from peft_core.lora import LoraConfig
from peft_core.methods import Method
from peft_core.tiny import build_tiny


def saved(tmp_path, kind="llama", task="causal-lm", **kwargs):
    model = peft_core.apply(build_tiny(kind, task), LoraConfig(r=4, **kwargs))
    peft_core.save_adapter(model, tmp_path, base_model_name_or_path="tiny-" + kind)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    return model, config, load_file(tmp_path / "adapter_model.safetensors")


def edit_config(tmp_path, **changes):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_config_file_is_what_hf_peft_reads(tmp_path):
    _, config, _ = saved(tmp_path, alpha=16)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 16.0, 0.05)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["fan_in_fan_out"] is False and config["use_dora"] is False
    assert config["bias"] == "none" and config["inference_mode"] is True
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert config["modules_to_save"] is None


def test_gpt2_conv1d_targets_save_fan_in_fan_out(tmp_path):
    _, config, tensors = saved(tmp_path, "gpt2")
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["c_attn"]
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 4)


def test_weight_keys_have_peft_prefix_and_no_adapter_name(tmp_path):
    _, config, tensors = saved(tmp_path, "bert", "seq-cls")
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    assert all(k.startswith("base_model.model.") for k in tensors)
    assert not any(".default." in k or "modules_to_save" in k for k in tensors)
    heads = {k for k in tensors if ".lora_" not in k}
    assert heads == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    lora = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"
    assert lora in tensors


def test_unknown_config_keys_are_ignored(tmp_path):
    saved(tmp_path)
    edit_config(tmp_path, some_future_option={"x": 1}, peft_version="9.9")
    assert peft_core.load_adapter(build_tiny("llama"), tmp_path).peft_core_config.r == 4


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"peft_type": "LOHA"}, "LOHA"),
        ({"use_dora": True}, "lora_magnitude_vector"),  # loads as DoRA: magnitudes missing
        ({"bias": "all"}, "bias"),
        ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
        ({"r": 0}, "r must be"),
    ],
)
def test_load_refuses_what_it_cannot_honour(tmp_path, changes, message):
    saved(tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        peft_core.load_adapter(build_tiny("llama"), tmp_path)


def test_load_is_strict_about_keys_and_shapes(tmp_path):
    _, _, tensors = saved(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    first = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != first}, weights)
    with pytest.raises(ValueError, match="missing 1"):
        peft_core.load_adapter(build_tiny("llama"), tmp_path)
    save_file({**tensors, "base_model.model.extra.lora_A.weight": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match="unexpected 1"):
        peft_core.load_adapter(build_tiny("llama"), tmp_path)
    save_file(tensors, weights)
    edit_config(tmp_path, r=8)
    with pytest.raises(ValueError, match="has shape"):
        peft_core.load_adapter(build_tiny("llama"), tmp_path)


def test_load_never_reads_pickles(tmp_path):
    saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        peft_core.load_adapter(build_tiny("llama"), tmp_path)


def test_api_errors_on_models_without_or_with_an_adapter():
    model = build_tiny("llama")
    for call in (peft_core.merge, peft_core.unmerge, lambda m: peft_core.disabled(m).__enter__()):
        with pytest.raises(ValueError, match="no peft_core adapter"):
            call(model)
    peft_core.apply(model, LoraConfig())
    with pytest.raises(ValueError, match="already has"):
        peft_core.apply(model, LoraConfig())
    with pytest.raises(ValueError, match="modules_to_save"):
        peft_core.apply(build_tiny("llama"), LoraConfig(modules_to_save=("head",)))
    with pytest.raises(TypeError):
        peft_core.apply(build_tiny("llama"), {"r": 8})


@dataclasses.dataclass(frozen=True)
class _SoftPromptConfig:
    title: ClassVar[str] = "Prompt tuning"
    mergeable: ClassVar[bool] = False
    modules_to_save: tuple[str, ...] = ()


def test_a_method_that_cannot_merge_says_so(monkeypatch):
    soft_prompt = Method(
        peft_type="PROMPT_TUNING",
        prefix="prompt_",
        config_cls=_SoftPromptConfig,
        layer_types=(),
        inject=lambda model, config: [],
        to_hf_config=lambda model, config: {},
        from_hf_config=lambda hf: _SoftPromptConfig(),
    )
    monkeypatch.setattr(peft_model, "METHODS", (*peft_model.METHODS, soft_prompt))
    model = peft_core.apply(build_tiny("llama"), _SoftPromptConfig())
    assert peft_core.trainable_parameters(model) == 0
    with pytest.raises(ValueError, match="Prompt tuning adapters cannot be merged"):
        peft_core.merge(model)


def test_load_adapter_files_loads_from_bytes_what_load_adapter_loads_from_disk(tmp_path):
    model, _, _ = saved(tmp_path)
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    from_disk = peft_core.load_adapter(build_tiny("llama"), tmp_path)
    from_bytes = peft_core.load_adapter_files(build_tiny("llama"), files)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.equal(from_bytes(input_ids=ids).logits, from_disk(input_ids=ids).logits)
        assert torch.equal(from_bytes(input_ids=ids).logits, expected)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        peft_core.load_adapter_files(build_tiny("llama"), {"adapter_config.json": b"{}"})
    with pytest.raises(ValueError, match="JSON object"):
        peft_core.load_adapter_files(build_tiny("llama"), files | {"adapter_config.json": b"[]"})
