"""DoRA's math against the written-out formula, its config and its HF PEFT config routing."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

import peft_core
from peft_core import dora, lora
from peft_core.dora import DoraConfig, DoraLinear
from peft_core.lora import LoraConfig, LoraLinear
from peft_core.model import method_for_hf_config
from peft_core.tiny import build_tiny

D_IN, D_OUT, R, ALPHA = 6, 5, 2, 4.0


def make_layer(kind: str, dropout: float = 0.0, seed: int = 0) -> DoraLinear:
    """A DoraLinear around a biased nn.Linear or Conv1D, every parameter moved off its init."""
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT) if kind == "linear" else Conv1D(D_OUT, D_IN)
    nn.init.normal_(base.bias)
    layer = DoraLinear(base, R, ALPHA, dropout, rslora=False)
    with torch.no_grad():
        for param in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector):
            param.add_(0.3 * torch.randn_like(param))
    return layer


def out_major(layer: DoraLinear) -> torch.Tensor:
    """W0 as (d_out, d_in), whatever the base layer's layout."""
    weight = layer.base_layer.weight
    return weight.T if isinstance(layer.base_layer, Conv1D) else weight


def reference(layer: DoraLinear, x: torch.Tensor, detach: bool = True) -> torch.Tensor:
    """h = m ⊙ (W0 + s·B·A)/‖W0 + s·B·A‖_r · x + b, the paper's eq. 5 spelled out."""
    w = out_major(layer) + layer.scale * layer.lora_B.weight @ layer.lora_A.weight
    norm = w.norm(dim=1, keepdim=True)  # (d_out, 1)
    w_adapted = layer.lora_magnitude_vector.view(-1, 1) * w / (norm.detach() if detach else norm)
    return x @ w_adapted.T + layer.base_layer.bias


LAYOUTS = ["linear", "conv1d"]


def test_config_is_lora_config_with_the_same_checks():
    config = DoraConfig(r=4, alpha=8, target_modules=["q_proj"])
    assert isinstance(config, LoraConfig) and config.target_modules == ("q_proj",)
    assert config.scale == 2.0
    with pytest.raises(ValueError, match="r must be"):
        DoraConfig(r=0)


def test_dora_and_lora_configs_build_their_own_layers():
    dora_model = peft_core.apply(build_tiny("llama"), DoraConfig(r=4))
    lora_model = peft_core.apply(build_tiny("llama"), LoraConfig(r=4))
    assert type(dora_model.model.layers[0].self_attn.q_proj) is DoraLinear
    assert type(lora_model.model.layers[0].self_attn.q_proj) is LoraLinear


@pytest.mark.parametrize("kind", LAYOUTS)
def test_magnitude_starts_at_the_row_norm_of_w0(kind):
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT) if kind == "linear" else Conv1D(D_OUT, D_IN)
    layer = DoraLinear(base, R, ALPHA, 0.0, rslora=False)
    assert layer.lora_magnitude_vector.shape == (D_OUT,)
    assert_close(layer.lora_magnitude_vector.detach(), out_major(layer).detach().norm(dim=1))


@pytest.mark.parametrize("kind", LAYOUTS)
def test_expanded_weight_norm_equals_the_direct_norm(kind):
    layer = make_layer(kind)
    with torch.no_grad():
        w = out_major(layer) + layer.scale * layer.lora_B.weight @ layer.lora_A.weight
        assert_close(layer.weight_norm(), w.norm(dim=1))
    assert not layer.weight_norm().requires_grad


@pytest.mark.parametrize("kind", LAYOUTS)
def test_forward_matches_the_written_out_formula(kind):
    layer = make_layer(kind)
    x = torch.randn(3, 4, D_IN)
    with torch.no_grad():
        assert_close(layer(x), reference(layer, x))


@pytest.mark.parametrize("kind", LAYOUTS)
def test_norm_is_detached_from_the_gradient(kind):
    """Paper §4.3: ‖W0 + ΔW‖ is a constant for backprop; m, A and B get the resulting grads."""
    layer = make_layer(kind)
    params = [layer.lora_magnitude_vector, layer.lora_A.weight, layer.lora_B.weight]
    x = torch.randn(3, D_IN)
    ours = torch.autograd.grad(layer(x).square().sum(), params)
    detached = torch.autograd.grad(reference(layer, x).square().sum(), params)
    through_norm = torch.autograd.grad(reference(layer, x, detach=False).square().sum(), params)
    for got, want in zip(ours, detached, strict=True):
        assert_close(got, want)
    assert not torch.allclose(ours[1], through_norm[1])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_hand_written_step_matches_autograd_of_hf_peft_form(kind, dropout):
    """DoraStep (frozen base) against the plain forward h = y + (g−1)·W0x̃ + g·s·BAx̃ (the same
    layer with its base trainable): same output, same gradients for x, A, B and the magnitude,
    with the same dropout masks."""
    layer = make_layer(kind).double().train()
    layer.lora_dropout = nn.Dropout(dropout)
    x = torch.randn(3, 4, D_IN, dtype=torch.float64)
    trainable = [layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector]
    results = []
    for base_trainable in (False, True):  # the hand-written step, then the plain path
        layer.base_layer.requires_grad_(base_trainable)
        assert layer.fast_path_applies(x) is not base_trainable
        x_in = x.clone().requires_grad_()
        torch.manual_seed(5)
        out = layer(x_in)
        out.sin().sum().backward()
        results.append([out.detach(), x_in.grad, *(p.grad for p in trainable)])
        layer.zero_grad(set_to_none=True)
    for got, expected in zip(*results, strict=True):
        assert_close(got, expected)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_cached_base_row_norms_follow_in_place_changes_of_w0(kind):
    layer = make_layer(kind)
    with torch.no_grad():
        layer.base_layer.weight.mul_(2.0)  # bumps the weight's version counter
    w = out_major(layer) + layer.scale * layer.lora_B.weight @ layer.lora_A.weight
    assert_close(layer.weight_norm(), w.norm(dim=1))


def test_dropout_feeds_the_dora_terms_as_hf_peft_does():
    """Training with dropout: h = W0·x + b + (g − 1)⊙W0·x̃ + g⊙s·B·A·x̃, x̃ the dropped input."""
    layer = make_layer("linear", dropout=0.5).train()
    x = torch.randn(4, D_IN)
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)
    x_drop = nn.functional.dropout(x, 0.5, training=True)
    w0, b = layer.base_layer.weight, layer.base_layer.bias
    g = layer.lora_magnitude_vector / layer.weight_norm()
    low_rank = x_drop @ (layer.scale * layer.lora_B.weight @ layer.lora_A.weight).T
    assert_close(got, x @ w0.T + b + (g - 1) * (x_drop @ w0.T) + g * low_rank)
    layer.eval()
    assert_close(layer(x), reference(layer, x))


@pytest.mark.parametrize("kind", LAYOUTS)
def test_merge_folds_the_adapted_weight_and_unmerge_restores_w0(kind):
    layer = make_layer(kind)
    x = torch.randn(3, D_IN)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        expected, unmerged = reference(layer, x), layer(x)
    layer.merge()
    layer.merge()  # idempotent
    with torch.no_grad():
        assert_close(layer(x), expected)
        assert_close(layer(x), unmerged, atol=1e-6, rtol=0)
    layer.unmerge()
    layer.unmerge()
    # W'/g − ΔW: exact up to the rounding of W0 + ΔW, as LoRA's W0 + ΔW − ΔW
    assert_close(layer.base_layer.weight.detach(), w0, atol=1e-6, rtol=0)
    assert layer.merged_norm is None and not layer.merged


def test_saved_adapter_is_hf_lora_with_use_dora(tmp_path):
    model = peft_core.apply(build_tiny("llama"), DoraConfig(r=4))
    peft_core.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"
    assert tensors[key].shape == (32,)
    assert len(tensors) == 2 * 2 * 3  # layers x (q, v) x (A, B, m)


def test_use_dora_routes_to_dora_and_only_there():
    hf = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    assert method_for_hf_config(hf) is lora.METHOD
    assert method_for_hf_config({**hf, "use_dora": False}) is lora.METHOD
    assert method_for_hf_config({**hf, "use_dora": True}) is dora.METHOD
    config = dora.from_hf_config({**hf, "use_dora": True})
    assert type(config) is DoraConfig and config.r == 4 and config.alpha == 8.0
    with pytest.raises(ValueError, match="use_dora"):
        lora.from_hf_config({**hf, "use_dora": True})
    with pytest.raises(ValueError, match="not DoRA"):
        dora.from_hf_config(hf)
    with pytest.raises(ValueError, match="lora_bias"):
        dora.from_hf_config({**hf, "use_dora": True, "lora_bias": True})


def test_fp32_adapter_beside_a_bf16_base():
    model = peft_core.apply(build_tiny("llama").to(torch.bfloat16), DoraConfig(r=4))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_magnitude_vector.dtype == torch.float32
    logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
