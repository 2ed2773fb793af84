"""MAM adapter: the composition of its two halves, its config and its saved files."""

import dataclasses
import json

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import peft_core
from peft_core import mam
from peft_core.bottleneck import BottleneckConfig, ParallelAdapter
from peft_core.mam import MAMConfig
from peft_core.model import adapter_state_dict
from peft_core.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from peft_core.tiny import build_tiny

ARCHITECTURES = [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("bert", "seq-cls")]
CONFIG = MAMConfig(num_virtual_tokens=3, bottleneck_dim=8, scaling=2.0)


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def perturbed_mam(kind: str, task: str, config: MAMConfig = CONFIG) -> nn.Module:
    model = peft_core.apply(build_tiny(kind, task), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def copy_owned(source: nn.Module, target: nn.Module, prefix: str) -> None:
    """Copy every state tensor with a path component starting with `prefix` (and the head)."""
    state = source.state_dict()
    owned = {
        key: value
        for key, value in state.items()
        if any(part.startswith(prefix) or part == "trained_module" for part in key.split("."))
    }
    missing = target.load_state_dict(owned, strict=False)
    assert not missing.unexpected_keys


def set_disabled(model: nn.Module, kind: type[nn.Module]) -> None:
    for module in model.modules():
        if isinstance(module, kind):
            module.disabled = True


@pytest.mark.parametrize(("kind", "task"), ARCHITECTURES)
def test_mam_without_its_prefix_is_the_parallel_adapter(kind, task, input_ids):
    model = perturbed_mam(kind, task)
    parallel = BottleneckConfig(placement="parallel", bottleneck_dim=8, scaling=2.0)
    adapter_only = peft_core.apply(build_tiny(kind, task), parallel).eval()
    copy_owned(model, adapter_only, "adapter_")
    set_disabled(model, PrefixEncoder)
    assert_close(logits(model, input_ids), logits(adapter_only, input_ids))


@pytest.mark.parametrize(("kind", "task"), ARCHITECTURES)
def test_mam_without_its_adapter_is_prefix_tuning(kind, task, input_ids):
    model = perturbed_mam(kind, task)
    prefix_only = peft_core.apply(build_tiny(kind, task), PrefixTuningConfig(3)).eval()
    copy_owned(model, prefix_only, "prefix_")
    set_disabled(model, ParallelAdapter)
    assert_close(logits(model, input_ids), logits(prefix_only, input_ids))


def test_both_halves_are_injected_and_trainable():
    model = peft_core.apply(build_tiny("llama"), CONFIG)
    adapters = [p for p, m in model.named_modules() if isinstance(m, ParallelAdapter)]
    assert adapters == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert isinstance(model.prefix_encoder, PrefixEncoder)
    trainable = {name.split(".")[-2] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adapter_down", "adapter_up", "prefix_encoder"}
    assert mam.METHOD.prefixes == ("adapter_", "prefix_")


def test_config_hands_each_half_its_fields():
    config = MAMConfig(
        num_virtual_tokens=5, projection_dim=7, bottleneck_dim=9, scaling=3.0, activation="tanh"
    )
    assert config.adapter_config() == BottleneckConfig(
        placement="parallel", bottleneck_dim=9, activation="tanh", scaling=3.0
    )
    assert config.prefix_config() == PrefixTuningConfig(num_virtual_tokens=5, projection_dim=7)
    default = MAMConfig()
    assert (default.num_virtual_tokens, default.scaling, default.reduction_factor) == (30, 4.0, 16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"projection_dim": 0}, "projection_dim"),
        ({"bottleneck_dim": 8, "reduction_factor": 4}, "exactly one"),
        ({"bottleneck_dim": -1}, "bottleneck_dim"),
        ({"scaling": 0}, "scaling"),
        ({"activation": "softmax"}, "activation"),
        ({"dropout": -0.1}, "dropout"),
        ({"modules_to_save": [1]}, "non-empty strings"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAMConfig(**kwargs)


def test_saved_files_hold_the_table_and_load_without_the_mlp(tmp_path, input_ids):
    config = dataclasses.replace(CONFIG, projection_dim=6, dropout=0.1)
    model = perturbed_mam("gpt2", "causal-lm", config)
    peft_core.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MAM"
    fields = ("num_virtual_tokens", "projection_dim", "bottleneck_dim", "reduction_factor")
    assert [saved[f] for f in fields] == [3, None, 8, None]
    assert [saved[f] for f in ("scaling", "activation", "dropout")] == [2.0, "relu", 0.1]
    tensors = adapter_state_dict(model)
    assert tensors["base_model.model.prefix_encoder.embedding"].shape == (3, 2 * 2 * 64)
    assert "base_model.model.transformer.h.1.mlp.adapter_up.bias" in tensors
    assert not any("prefix_encoder.transform" in key for key in tensors)
    loaded = peft_core.load_adapter(build_tiny("gpt2"), tmp_path).eval()
    assert loaded.peft_core_config == dataclasses.replace(config, projection_dim=None)
    assert_close(logits(loaded, input_ids), logits(model, input_ids))
