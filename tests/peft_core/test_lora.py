"""LoRA: config bounds, the layer's math, and the method battery on tiny Llama / GPT-2 / BERT."""

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

import peft_core
from peft_core.lora import LoraConfig, LoraLinear, SharedInput, share_inputs
from peft_core.tiny import build_tiny

CASES = [
    ("llama", "causal-lm"),
    ("gpt2", "causal-lm"),
    ("llama", "seq-cls"),
    ("gpt2", "seq-cls"),
    ("bert", "seq-cls"),
]
TARGETS = [None, "all-linear"]
R = 4

# r·(d_in + d_out) per adapted layer, 2 layers; hidden 64, FFN 128, Llama k/v 32 wide (GQA),
# GPT-2 c_attn 64 -> 192.
ADAPTER_PARAMS = {
    ("llama", None): 2 * R * ((64 + 64) + (64 + 32)),
    ("llama", "all-linear"): 2 * R * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128)),
    ("gpt2", None): 2 * R * (64 + 192),
    ("gpt2", "all-linear"): 2 * R * ((64 + 192) + (64 + 64) + 2 * (64 + 128)),
    ("bert", None): 2 * R * 2 * (64 + 64),
    ("bert", "all-linear"): 2 * R * (4 * (64 + 64) + 2 * (64 + 128)) + R * (64 + 64),  # + pooler
}
HEAD_PARAMS = {"llama": 64 * 2, "gpt2": 64 * 2, "bert": 64 * 2 + 2}  # score has no bias


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def adapted(kind: str, task: str, target=None, **kwargs) -> nn.Module:
    """Dropout off unless asked for: the hand-written step and exact comparisons need it off."""
    kwargs = {"dropout": 0.0, **kwargs}
    config = LoraConfig(r=R, alpha=8.0, target_modules=target, **kwargs)
    return peft_core.apply(build_tiny(kind, task), config)


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Move every trainable tensor away from its init (lora_B = 0 would hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def loss_of(model: nn.Module, input_ids: torch.Tensor, task: str) -> torch.Tensor:
    labels = input_ids if task == "causal-lm" else torch.tensor([0, 1])
    return model(input_ids, labels=labels).loss


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs",
    [
        {"r": 0},
        {"r": 1025},
        {"r": 2.5},
        {"r": True},
        {"alpha": 0},
        {"alpha": -1.0},
        {"alpha": 10_001},
        {"alpha": "16"},
        {"dropout": -0.1},
        {"dropout": 1.0},
        {"target_modules": []},
        {"target_modules": "("},
        {"target_modules": ["q_proj", ""]},
        {"modules_to_save": [3]},
    ],
)
def test_config_rejects_out_of_bounds(kwargs):
    with pytest.raises(ValueError):
        LoraConfig(**kwargs)


def test_config_normalises_lists_and_is_frozen():
    config = LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save="score")
    assert config.target_modules == ("q_proj", "v_proj")
    assert config.modules_to_save == ("score",)
    assert LoraConfig(r=1024, alpha=10_000, dropout=0.99).r == 1024
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 4


def test_scale_is_alpha_over_r_or_over_sqrt_r():
    assert LoraConfig(r=16, alpha=32).scale == 2.0
    assert LoraConfig(r=16, alpha=32, use_rslora=True).scale == 8.0


# ---------------------------------------------------------------- layer


def test_lora_linear_init_is_kaiming_a_and_zero_b():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(64, 32), r=8, alpha=16, dropout=0.0, rslora=False)
    assert layer.lora_A.weight.shape == (8, 64) and layer.lora_B.weight.shape == (32, 8)
    assert layer.lora_A.weight.abs().max() <= 1 / math.sqrt(64)  # kaiming-uniform(a=√5) bound
    assert layer.lora_A.weight.std() > 0
    assert torch.count_nonzero(layer.lora_B.weight) == 0


@pytest.mark.parametrize("base_cls", [nn.Linear, Conv1D])
def test_lora_linear_forward_is_w0x_plus_scaled_bax(base_cls):
    torch.manual_seed(0)
    base = nn.Linear(16, 24) if base_cls is nn.Linear else Conv1D(24, 16)  # Conv1D(nf=out, nx=in)
    layer = LoraLinear(base, r=4, alpha=8, dropout=0.0, rslora=False)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 16)
    w0 = base.weight.T if base_cls is Conv1D else base.weight  # (d_out, d_in)
    expected = x @ w0.T + base.bias + 2.0 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    assert_close(layer(x), expected)
    layer.merge()
    assert_close(layer(x), expected, atol=1e-5, rtol=0)
    assert layer.delta_weight().shape == base.weight.shape


def _forward_and_grads(layer: LoraLinear, x: torch.Tensor) -> list[torch.Tensor]:
    """Output, then the gradients of x, A and B for a non-linear loss (dropout masks seeded)."""
    x = x.clone().requires_grad_()
    torch.manual_seed(3)
    out = layer(x)
    out.sin().sum().backward()
    grads = [x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    layer.zero_grad(set_to_none=True)
    return [out.detach(), *grads]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("base_cls", [nn.Linear, Conv1D])
def test_hand_written_step_matches_autograd_of_the_plain_forward(base_cls, dropout):
    """The hand-written step (frozen base) against the plain path (the same layer with its
    base trainable, which the step leaves to autograd): same output, same gradients of x, A
    and B, with the same dropout masks (both draw nn.Dropout's)."""
    torch.manual_seed(0)
    base = nn.Linear(16, 24) if base_cls is nn.Linear else Conv1D(24, 16)
    base.requires_grad_(False)
    layer = LoraLinear(base, r=4, alpha=8, dropout=dropout, rslora=False).double().train()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    assert layer.fast_path_applies(x)
    fast = _forward_and_grads(layer, x)
    base.requires_grad_(True)
    assert not layer.fast_path_applies(x)
    plain = _forward_and_grads(layer, x)
    for got, expected in zip(fast, plain, strict=True):
        assert_close(got, expected)


def test_hand_written_step_is_skipped_where_it_does_not_apply():
    layer = LoraLinear(nn.Linear(8, 8), r=2, alpha=4, dropout=0.5, rslora=False).train()
    x = torch.randn(2, 8)
    assert not layer.fast_path_applies(x)  # the base weight is trainable here
    layer.base_layer.requires_grad_(False)
    assert layer.fast_path_applies(x)  # dropout is part of the step
    assert not layer.fast_path_applies(x.double())  # x and W0 differ and no autocast joins them
    assert layer.eval().fast_path_applies(x)


def _group_names(model: nn.Module) -> set[tuple[str, ...]]:
    groups = {m.shared_input for m in model.modules() if getattr(m, "shared_input", None)}
    names = {id(m): path.rsplit(".", 1)[-1] for path, m in model.named_modules()}
    return {tuple(names[id(m)] for m in group.members) for group in groups}


def test_siblings_called_on_one_input_share_it():
    assert _group_names(adapted("llama", "causal-lm", "all-linear")) == {
        ("q_proj", "k_proj", "v_proj"),
        ("gate_proj", "up_proj"),
    }
    assert _group_names(adapted("llama", "causal-lm")) == {("q_proj", "v_proj")}
    assert _group_names(adapted("gpt2", "causal-lm", "all-linear")) == set()  # fused c_attn
    dora = peft_core.apply(build_tiny("llama"), peft_core.DoraConfig(target_modules="all-linear"))
    assert _group_names(dora) == set()


def _loss_and_grads(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return {"loss": loss.detach(), **grads}


def test_shared_input_step_matches_the_per_layer_step(input_ids):
    grouped = adapted("llama", "causal-lm", "all-linear").train()
    perturb(grouped)
    single = copy.deepcopy(grouped)
    for layer in single.modules():
        if isinstance(layer, LoraLinear):
            layer.shared_input = None
    expected = _loss_and_grads(single, input_ids)
    got = _loss_and_grads(grouped, input_ids)
    assert got.keys() == expected.keys()
    for name, value in got.items():
        assert_close(value, expected[name], msg=name)
    assert all(not m.pending and m.x is None for m in _shared_inputs(grouped))


def _shared_inputs(model: nn.Module) -> list[SharedInput]:
    return [m.shared_input for m in model.modules() if getattr(m, "shared_input", None)]


class CrossAttentionProjections(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(8, 8) for _ in range(3))


def test_a_group_whose_members_see_different_inputs_turns_itself_off():
    torch.manual_seed(0)
    model = CrossAttentionProjections().requires_grad_(False)
    reference = copy.deepcopy(model)
    paths = ["q_proj", "k_proj", "v_proj"]
    for path in paths:
        layer = LoraLinear(model.get_submodule(path), r=2, alpha=4, dropout=0.0, rslora=False)
        nn.init.normal_(layer.lora_B.weight)
        model.set_submodule(path, layer)
    share_inputs(model, paths)
    query, memory = torch.randn(3, 8), torch.randn(5, 8)
    outputs = [model.q_proj(query), model.k_proj(memory), model.v_proj(memory)]
    group = model.q_proj.shared_input
    assert not group.shared and not group.pending and group.x is None
    for out, path, x in zip(outputs, paths, (query, memory, memory), strict=True):
        layer = model.get_submodule(path)
        delta = 2.0 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
        assert_close(out, reference.get_submodule(path)(x) + delta)
    share_inputs(model, paths)  # a fresh group, half used: k and v outputs are pending
    model.q_proj(query)
    assert set(model.q_proj.shared_input.pending) == {1, 2}
    copied = copy.deepcopy(model)  # pending outputs (with a grad_fn) are not copied
    assert not copied.q_proj.shared_input.pending
    assert copied.k_proj.shared_input is copied.q_proj.shared_input


def test_lora_linear_keeps_float32_adapter_on_bf16_base():
    layer = LoraLinear(
        nn.Linear(8, 8, dtype=torch.bfloat16), r=2, alpha=4, dropout=0.1, rslora=False
    )
    assert layer.lora_A.weight.dtype == torch.float32
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("base", [nn.Linear(64, 48), Conv1D(48, 64)], ids=["linear", "conv1d"])
def test_merging_into_a_bf16_weight_rounds_the_sum_once(base):
    """W + ΔW with ΔW in float32, then one rounding to bf16: the nearest bf16 to the merged
    weight (rounding ΔW to bf16 first, then the sum, lands elsewhere in many entries)."""
    layer = LoraLinear(base.to(torch.bfloat16), r=4, alpha=8, dropout=0.0, rslora=False)
    perturb(layer, seed=2)
    w0, delta = layer.base_layer.weight.clone(), layer.delta_weight()
    once = (w0.float() + delta).to(torch.bfloat16)
    assert (w0 + delta.to(torch.bfloat16) != once).any()  # the two ways differ here
    layer.merge()
    assert torch.equal(layer.base_layer.weight, once)
    layer.unmerge()
    assert_close(layer.base_layer.weight, w0, atol=0.02, rtol=0.01)  # bf16 cannot undo exactly


# ---------------------------------------------------------------- battery


@pytest.mark.parametrize("kind,task", CASES)
@pytest.mark.parametrize("target", TARGETS)
def test_identity_at_init(kind, task, target, input_ids):
    base = logits(build_tiny(kind, task), input_ids)
    assert torch.equal(logits(adapted(kind, task, target), input_ids), base)


@pytest.mark.parametrize("kind,task", CASES)
@pytest.mark.parametrize("target", TARGETS)
def test_only_adapter_params_change_after_a_step(kind, task, target, input_ids):
    model = adapted(kind, task, target).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_of(model, input_ids, task).backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert all(".lora_" in k or ".trained_module." in k for k in changed), changed
    assert any(".lora_B." in k for k in changed)
    assert any(".trained_module." in k for k in changed) == (task == "seq-cls")


@pytest.mark.parametrize("kind,task", CASES)
@pytest.mark.parametrize("target", TARGETS)
def test_trainable_count_is_r_times_din_plus_dout_plus_head(kind, task, target):
    model = adapted(kind, task, target)
    head = HEAD_PARAMS[kind] if task == "seq-cls" else 0
    assert peft_core.trainable_parameters(model) == ADAPTER_PARAMS[kind, target] + head


@pytest.mark.parametrize("kind,task", CASES)
@pytest.mark.parametrize("target", TARGETS)
def test_merge_matches_unmerged_and_unmerge_restores_base(kind, task, target, input_ids):
    model = adapted(kind, task, target)
    perturb(model)
    out = logits(model, input_ids)
    base_weights = {k: v.clone() for k, v in model.state_dict().items() if ".base_layer." in k}
    peft_core.merge(model)
    assert_close(logits(model, input_ids), out, atol=1e-5, rtol=0)
    state = model.state_dict()
    assert not all(torch.equal(state[k], v) for k, v in base_weights.items())
    peft_core.unmerge(model)
    state = model.state_dict()
    for key, weight in base_weights.items():
        assert_close(state[key], weight, atol=1e-6, rtol=0)
    assert_close(logits(model, input_ids), out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,task", CASES)
@pytest.mark.parametrize("target", TARGETS)
def test_disabled_gives_base_output(kind, task, target, input_ids):
    base = logits(build_tiny(kind, task), input_ids)
    model = adapted(kind, task, target)
    perturb(model)
    out = logits(model, input_ids)
    assert not torch.allclose(out, base, atol=1e-3)
    with peft_core.disabled(model):
        assert torch.equal(logits(model, input_ids), base)
    assert torch.equal(logits(model, input_ids), out)
    peft_core.merge(model)
    with peft_core.disabled(model):
        assert_close(logits(model, input_ids), base, atol=1e-5, rtol=0)
    assert_close(logits(model, input_ids), out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,task", CASES)
@pytest.mark.parametrize("target", TARGETS)
def test_save_then_load_in_fresh_model_reproduces_outputs(kind, task, target, input_ids, tmp_path):
    model = adapted(kind, task, target, use_rslora=target is None)
    perturb(model)
    peft_core.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    fresh = peft_core.load_adapter(build_tiny(kind, task), tmp_path)
    assert_close(logits(fresh, input_ids), logits(model, input_ids), atol=1e-6, rtol=0)
    loaded, saved = fresh.peft_core_config, model.peft_core_config
    assert (loaded.r, loaded.alpha, loaded.use_rslora) == (saved.r, saved.alpha, saved.use_rslora)
    assert loaded.modules_to_save == saved.modules_to_save
    assert peft_core.trainable_parameters(fresh) == peft_core.trainable_parameters(model)


def test_apply_returns_same_model_and_records_config_with_head():
    model = build_tiny("bert", "seq-cls")
    assert peft_core.apply(model, LoraConfig()) is model
    assert model.peft_core_config == LoraConfig(modules_to_save=("classifier",))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "classifier.original_module.weight" in frozen
    assert "bert.encoder.layer.0.attention.self.query.base_layer.weight" in frozen


def test_the_adapter_takes_the_models_mode_so_an_eval_model_drops_nothing(input_ids):
    """A new module starts in training mode: loaded into an eval model, the adapter applied
    its dropout at inference (two forwards differed) until apply gave it the model's mode."""
    model = peft_core.apply(build_tiny("llama"), LoraConfig(r=R, dropout=0.5))
    perturb(model)
    assert not any(m.training for m in model.modules())
    assert_close(logits(model, input_ids), logits(model, input_ids), rtol=0, atol=0)
    model.train()
    assert not torch.equal(logits(model, input_ids), logits(model, input_ids))
