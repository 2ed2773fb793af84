"""Bottleneck adapters: the layers against their written-out formulas, placements, config, files."""

import json

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

import peft_core
from peft_core.bottleneck import BottleneckConfig, ParallelAdapter, SequentialAdapter
from peft_core.configs import DEFAULT_REDUCTION_FACTOR
from peft_core.model import adapter_state_dict, hf_config
from peft_core.tiny import build_tiny

D, M = 6, 3
ACTS = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu}
ACTS["tanh"] = torch.tanh


def perturb(layer: nn.Module, seed: int = 0) -> None:
    """Move the adapter off its init: W_up = 0 would make every formula trivially hold."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.startswith("adapter_"):
                param.add_(0.5 * torch.randn(param.shape, generator=generator))


def branch(layer: nn.Module, x: torch.Tensor, activation: str, scaling: float = 1.0):
    """s·(f(x·W_down + b_down)·W_up + b_up), nn.Linear storing W_down, W_up transposed."""
    down, up = layer.adapter_down, layer.adapter_up
    return scaling * (ACTS[activation](x @ down.weight.T + down.bias) @ up.weight.T + up.bias)


def adapter_paths(model: nn.Module) -> list[str]:
    types = (SequentialAdapter, ParallelAdapter)
    return [path for path, m in model.named_modules() if isinstance(m, types)]


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
def test_sequential_adapter_is_y_plus_branch_of_y(base_kind, activation):
    torch.manual_seed(0)
    base = nn.Linear(4, D) if base_kind == "linear" else Conv1D(D, 4)
    layer = SequentialAdapter(base, D, BottleneckConfig(bottleneck_dim=M, activation=activation))
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        assert_close(layer(x), base(x))  # W_up = 0, b_up = 0 at init
        perturb(layer)
        y = base(x)
        assert_close(layer(x), y + branch(layer, y, activation))
    assert layer.adapter_down.weight.shape == (M, D) and layer.adapter_up.weight.shape == (D, M)
    assert layer.adapter_down.weight.abs().sum() > 0


def test_parallel_adapter_adds_the_scaled_branch_of_the_ffn_input():
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
    config = BottleneckConfig(placement="parallel", bottleneck_dim=M, scaling=2.5)
    layer = ParallelAdapter(ffn, D, config, residual=False)
    perturb(layer)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        assert_close(layer(x), ffn(x) + branch(layer, x, "relu", scaling=2.5))


@pytest.mark.parametrize("placement,scaling", [("houlsby", 1.0), ("parallel", 2.5)])
def test_in_place_sums_give_the_gradients_of_the_written_out_formula(placement, scaling):
    """The branch is scaled and the residual added in place: autograd must still see y + s·branch."""
    torch.manual_seed(0)
    base = nn.Linear(D, D)
    config = BottleneckConfig(placement=placement, bottleneck_dim=M, scaling=scaling)
    layer = (
        ParallelAdapter(base, D, config, residual=False)
        if placement == "parallel"
        else SequentialAdapter(base, D, config)
    )
    perturb(layer)
    x = torch.randn(2, 5, D)

    def written_out(x: torch.Tensor) -> torch.Tensor:
        y = base(x)
        return y + branch(layer, x if placement == "parallel" else y, "relu", scaling)

    grads = []
    for compute in (layer, written_out):
        compute(x).sin().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
        layer.zero_grad(set_to_none=True)
    for got, expected in zip(*grads, strict=True):
        assert_close(got, expected)


class AddAndNorm(nn.Module):
    """BertOutput's shape: LayerNorm(dense(h_ff) + residual)."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(2 * D, D)
        self.norm = nn.LayerNorm(D)

    def forward(self, h_ff: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dense(h_ff) + residual)


def test_parallel_adapter_with_a_residual_block_adds_before_the_norm():
    torch.manual_seed(0)
    block = AddAndNorm()
    config = BottleneckConfig(placement="parallel", bottleneck_dim=M, scaling=0.5)
    layer = ParallelAdapter(block, D, config, residual=True)
    perturb(layer)
    h_ff, x = torch.randn(2, 5, 2 * D), torch.randn(2, 5, D)
    with torch.no_grad():
        expected = block.norm(block.dense(h_ff) + x + branch(layer, x, "relu", scaling=0.5))
        assert_close(layer(h_ff, x), expected)
        layer.disabled = True
        assert_close(layer(h_ff, x), block(h_ff, x))


def test_adapter_stays_float32_beside_a_bf16_base_and_returns_bf16():
    base = nn.Linear(D, D).to(torch.bfloat16)
    layer = SequentialAdapter(base, D, BottleneckConfig(bottleneck_dim=M))
    assert layer.adapter_down.weight.dtype == torch.float32
    assert layer(torch.randn(3, D, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_dropout_acts_on_the_branch_input_only_while_training():
    torch.manual_seed(0)
    layer = SequentialAdapter(nn.Linear(D, D), D, BottleneckConfig(bottleneck_dim=M, dropout=0.5))
    perturb(layer)
    x = torch.randn(64, D)
    with torch.no_grad():
        layer.eval()
        y = layer.base_layer(x)
        assert_close(layer(x), y + branch(layer, y, "relu"))
        layer.train()
        assert not torch.allclose(layer(x), y + branch(layer, y, "relu"))


SITES = {
    # (placement, kind) -> the adapted modules of layer 0, relative to the block
    ("houlsby", "llama"): ["self_attn.o_proj", "mlp.down_proj"],
    ("houlsby", "gpt2"): ["attn.c_proj", "mlp.c_proj"],
    ("houlsby", "bert"): ["attention.output.dense", "output.dense"],
    ("pfeiffer", "llama"): ["mlp.down_proj"],
    ("pfeiffer", "gpt2"): ["mlp.c_proj"],
    ("pfeiffer", "bert"): ["output.dense"],
    ("parallel", "llama"): ["mlp"],
    ("parallel", "gpt2"): ["mlp"],
    ("parallel", "bert"): ["output"],
}
BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h", "bert": "bert.encoder.layer"}


@pytest.mark.parametrize(("placement", "kind"), list(SITES))
def test_placement_wraps_the_documented_modules_of_every_layer(placement, kind):
    task = "seq-cls" if kind == "bert" else "causal-lm"
    model = peft_core.apply(build_tiny(kind, task), BottleneckConfig(placement=placement))
    expected = {f"{BLOCKS[kind]}.{i}.{site}" for i in range(2) for site in SITES[placement, kind]}
    assert set(adapter_paths(model)) == expected
    assert len(adapter_paths(model)) == (4 if placement == "houlsby" else 2)


def test_reduction_factor_sets_the_width_from_the_model():
    model = peft_core.apply(build_tiny("llama"), BottleneckConfig(reduction_factor=16))
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.adapter_down.out_features == 64 // 16
    assert BottleneckConfig(reduction_factor=1000).width(64) == 1


def test_a_model_that_cannot_run_is_refused_by_name():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.ModuleDict({"ffn": nn.Linear(4, 4)})])

    with pytest.raises(ValueError, match=r"cannot trace a forward of this Toy"):
        peft_core.apply(Toy(), BottleneckConfig())


def test_config_defaults_to_reduction_factor_16():
    config = BottleneckConfig()
    assert (config.placement, config.bottleneck_dim) == ("houlsby", None)
    assert config.reduction_factor == DEFAULT_REDUCTION_FACTOR == 16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bottleneck_dim": 8, "reduction_factor": 4}, "exactly one"),
        ({"bottleneck_dim": 0}, "bottleneck_dim"),
        ({"bottleneck_dim": True}, "bottleneck_dim"),
        ({"bottleneck_dim": 8.0}, "bottleneck_dim"),
        ({"reduction_factor": 0}, "reduction_factor"),
        ({"placement": "sideways"}, "placement"),
        ({"activation": "softmax"}, "activation"),
        ({"placement": "houlsby", "scaling": 2.0}, "parallel adapters only"),
        ({"placement": "parallel", "scaling": 0.0}, "scaling"),
        ({"placement": "parallel", "scaling": "4"}, "scaling"),
        ({"dropout": 1.0}, "dropout"),
        ({"modules_to_save": [""]}, "non-empty"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BottleneckConfig(**kwargs)


def test_saved_files_hold_our_config_and_adapter_keys(tmp_path):
    config = BottleneckConfig(
        placement="parallel", bottleneck_dim=5, activation="tanh", scaling=4.0, dropout=0.1
    )
    model = peft_core.apply(build_tiny("bert", "seq-cls"), config)
    peft_core.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved == hf_config(model)
    assert saved["peft_type"] == "BOTTLENECK" and saved["task_type"] == "SEQ_CLS"
    fields = ("placement", "bottleneck_dim", "reduction_factor", "activation", "scaling", "dropout")
    assert [saved[f] for f in fields] == ["parallel", 5, None, "tanh", 4.0, 0.1]
    keys = set(adapter_state_dict(model))
    assert "base_model.model.bert.encoder.layer.1.output.adapter_down.weight" in keys
    assert "base_model.model.bert.encoder.layer.1.output.adapter_up.bias" in keys
    assert len(keys) == 2 * 4 + 2  # four tensors per layer, the classifier's weight and bias
    loaded = peft_core.load_adapter(build_tiny("bert", "seq-cls"), tmp_path)
    assert loaded.peft_core_config == model.peft_core_config
