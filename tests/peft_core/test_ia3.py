"""(IA)³'s math against the written-out formula, its defaults per architecture and its config."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

import peft_core
from peft_core import ia3
from peft_core.ia3 import IA3Config, IA3Linear
from peft_core.model import hf_config
from peft_core.tiny import build_tiny

D_IN, D_OUT = 6, 5
LAYOUTS = ["linear", "conv1d"]


def make_layer(kind: str, feedforward: bool, seed: int = 0) -> IA3Linear:
    """An IA3Linear around a biased nn.Linear or Conv1D, its vector moved off the ones."""
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT) if kind == "linear" else Conv1D(D_OUT, D_IN)
    nn.init.normal_(base.bias)
    layer = IA3Linear(base, feedforward)
    with torch.no_grad():
        layer.ia3_l.add_(0.5 * torch.randn_like(layer.ia3_l))
    return layer


def out_major(layer: IA3Linear) -> torch.Tensor:
    weight = layer.base_layer.weight
    return weight.T if isinstance(layer.base_layer, Conv1D) else weight


def reference(layer: IA3Linear, x: torch.Tensor) -> torch.Tensor:
    """Feed-forward: W·(l ⊙ x) + b; otherwise l ⊙ (W·x + b)."""
    w, b, l_vec = out_major(layer), layer.base_layer.bias, layer.ia3_l.flatten()
    if layer.feedforward:
        return (l_vec * x) @ w.T + b
    return l_vec * (x @ w.T + b)


def ia3_layers(model: nn.Module) -> dict[str, tuple[bool, tuple[int, ...]]]:
    return {
        path: (m.feedforward, tuple(m.ia3_l.shape))
        for path, m in model.named_modules()
        if isinstance(m, IA3Linear)
    }


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_vector_shape_init_and_forward(kind, feedforward):
    base = nn.Linear(D_IN, D_OUT) if kind == "linear" else Conv1D(D_OUT, D_IN)
    fresh = IA3Linear(base, feedforward)
    assert fresh.ia3_l.shape == ((1, D_IN) if feedforward else (D_OUT, 1))
    assert torch.equal(fresh.ia3_l, torch.ones_like(fresh.ia3_l))
    layer = make_layer(kind, feedforward)
    x = torch.randn(3, 4, D_IN)
    with torch.no_grad():
        assert_close(layer(x), reference(layer, x))


@pytest.mark.parametrize("kind", LAYOUTS)
def test_feedforward_step_on_a_frozen_base_has_the_formula_s_gradients(kind):
    """ScaledInputLinear scales W, not x: same output and same ∂x, ∂l as autograd of W·(l ⊙ x) + b."""
    layer = make_layer(kind, feedforward=True).double()
    layer.base_layer.requires_grad_(False)
    x = torch.randn(3, 4, D_IN, dtype=torch.float64)
    results = []
    for compute in (layer, lambda x: reference(layer, x)):
        x_in = x.clone().requires_grad_()
        out = compute(x_in)
        out.sin().sum().backward()
        results.append([out.detach(), x_in.grad, layer.ia3_l.grad])
        layer.zero_grad(set_to_none=True)
    assert layer(x).grad_fn.name() == "ScaledInputLinearBackward"
    for got, expected in zip(*results, strict=True):
        assert_close(got, expected)


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_merge_folds_into_weight_and_bias_and_unmerge_restores(kind, feedforward):
    layer = make_layer(kind, feedforward)
    w0, b0 = out_major(layer).detach().clone(), layer.base_layer.bias.detach().clone()
    l_vec = layer.ia3_l.detach().flatten()
    x = torch.randn(3, D_IN)
    with torch.no_grad():
        unmerged = layer(x)
    layer.merge()
    layer.merge()  # idempotent
    if feedforward:  # W·diag(l), bias untouched
        assert_close(out_major(layer), w0 * l_vec.view(1, -1))
        assert torch.equal(layer.base_layer.bias, b0)
    else:  # diag(l)·W, l ⊙ b
        assert_close(out_major(layer), w0 * l_vec.view(-1, 1))
        assert_close(layer.base_layer.bias.detach(), b0 * l_vec)
    with torch.no_grad():
        assert_close(layer(x), unmerged)
    layer.unmerge()
    layer.unmerge()
    assert_close(out_major(layer).detach(), w0)
    assert_close(layer.base_layer.bias.detach(), b0)


def test_merge_refuses_a_vector_that_it_could_not_undo():
    layer = make_layer("linear", feedforward=False)
    with torch.no_grad():
        layer.ia3_l[2, 0] = 0.0
    with pytest.raises(ValueError, match="zero entry"):
        layer.merge()
    assert not layer.merged


def _layer_names(paths: dict, layer: int = 0) -> dict[str, tuple[bool, tuple[int, ...]]]:
    prefix = f".{layer}."
    return {path.split(prefix, 1)[1]: v for path, v in paths.items() if prefix in path}


def test_llama_defaults_scale_k_v_outputs_and_down_proj_input():
    model = peft_core.apply(build_tiny("llama"), IA3Config())
    assert _layer_names(ia3_layers(model)) == {
        "self_attn.k_proj": (False, (32, 1)),
        "self_attn.v_proj": (False, (32, 1)),
        "mlp.down_proj": (True, (1, 128)),
    }


def test_gpt2_defaults_scale_the_whole_fused_c_attn_output():
    model = peft_core.apply(build_tiny("gpt2"), IA3Config())
    assert _layer_names(ia3_layers(model)) == {
        "attn.c_attn": (False, (192, 1)),  # q, k and v
        "mlp.c_proj": (True, (1, 128)),  # attn.c_proj is not adapted
    }


def test_bert_defaults_also_scale_the_attention_output_input():
    model = peft_core.apply(build_tiny("bert", "seq-cls"), IA3Config())
    assert _layer_names(ia3_layers(model)) == {
        "attention.self.key": (False, (64, 1)),
        "attention.self.value": (False, (64, 1)),
        "attention.output.dense": (True, (1, 64)),  # "output.dense" matches it too
        "output.dense": (True, (1, 128)),
    }


def test_explicit_targets_take_the_default_feedforward_table():
    model = peft_core.apply(build_tiny("llama"), IA3Config(target_modules=["v_proj", "down_proj"]))
    assert _layer_names(ia3_layers(model)) == {
        "self_attn.v_proj": (False, (32, 1)),
        "mlp.down_proj": (True, (1, 128)),
    }
    none_ff = IA3Config(target_modules=("down_proj",), feedforward_modules=())
    model = peft_core.apply(build_tiny("llama"), none_ff)
    assert _layer_names(ia3_layers(model)) == {"mlp.down_proj": (False, (64, 1))}


def test_regex_feedforward_modules():
    config = IA3Config(target_modules=r".*\.(v_proj|up_proj)", feedforward_modules=r".*up_proj")
    model = peft_core.apply(build_tiny("llama"), config)
    assert _layer_names(ia3_layers(model), layer=1) == {
        "self_attn.v_proj": (False, (32, 1)),
        "mlp.up_proj": (True, (1, 64)),
    }


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, "subset"),
        ({"feedforward_modules": "all-linear"}, "all-linear"),
        ({"target_modules": []}, "empty"),
        ({"target_modules": "("}, "regex"),
        ({"feedforward_modules": [""]}, "non-empty"),
    ],
)
def test_config_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IA3Config(**kwargs)


def test_feedforward_modules_matching_no_adapted_module_is_an_error():
    with pytest.raises(ValueError, match="matched none"):
        peft_core.apply(build_tiny("llama"), IA3Config(feedforward_modules=r".*mlp"))


def test_hf_config_lists_targets_and_a_feedforward_subset():
    model = peft_core.apply(build_tiny("gpt2"), IA3Config())
    config = hf_config(model)
    assert config["peft_type"] == "IA3" and config["fan_in_fan_out"] is True
    # "c_proj" alone would also select attn.c_proj: full paths instead
    assert config["feedforward_modules"] == [f"transformer.h.{i}.mlp.c_proj" for i in (0, 1)]
    assert set(config["feedforward_modules"]) <= set(config["target_modules"])
    llama = hf_config(peft_core.apply(build_tiny("llama"), IA3Config()))
    assert llama["target_modules"] == ["down_proj", "k_proj", "v_proj"]
    assert llama["feedforward_modules"] == ["down_proj"]


def test_hf_config_falls_back_to_full_paths_to_keep_the_subset():
    """Layer-0 k_proj + every down_proj: targets need full paths, "down_proj" alone would do
    for feedforward, but HF PEFT wants feedforward names among the target names."""
    config = IA3Config(target_modules=r"model\.layers\.0\.self_attn\.k_proj|.*down_proj")
    model = peft_core.apply(build_tiny("llama"), config)
    written = hf_config(model)
    assert "down_proj" not in written["feedforward_modules"]
    assert set(written["feedforward_modules"]) <= set(written["target_modules"])
    assert ia3.from_hf_config(written).feedforward_modules == tuple(written["feedforward_modules"])


def test_from_hf_config():
    hf = {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"]}
    config = ia3.from_hf_config({**hf, "feedforward_modules": ["down_proj"]})
    assert config == IA3Config(("k_proj", "down_proj"), ("down_proj",))
    assert ia3.from_hf_config(hf).feedforward_modules is None  # HF PEFT: the default table
    with pytest.raises(ValueError, match="exclude_modules"):
        ia3.from_hf_config({**hf, "exclude_modules": ["k_proj"]})
