"""The hand-written LoRA/DoRA steps (peft_core/lora_steps.py, dora.py) where users train: with
dropout, under autocast on a half base with fp32 adapters, under gradient checkpointing and
on an NF4 base. Gradients are set against HF PEFT's for the same weights and the same
dropout masks (one seed: both draw nn.Dropout's masks in the same order); every test also
checks that our step, not the plain autograd path, computed them."""

import copy

import peft
import pytest
import torch
from torch import nn

import peft_core
from peft_core import catalogue
from peft_core.configs import DoraConfig, LoraConfig
from peft_core.dora import inject_dora
from peft_core.lora import LoraLinear, inject_lora
from peft_core.model import load_adapter_tensors
from peft_core.tiny import build_tiny

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
STEP_NODES = {"LowRankStepBackward", "DoraStepBackward"}


class Attentionish(nn.Module):
    """q, k, v read one x (LoRA groups them), o reads their mix."""

    def __init__(self, width: int = 32):
        super().__init__()
        for name in PROJECTIONS:
            setattr(self, name, nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(torch.tanh(q * k) + v)


def step_nodes(loss: torch.Tensor) -> list[str]:
    """Names of our steps' backward nodes in loss's autograd graph."""
    seen, stack, found = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in STEP_NODES:
            found.append(type(node).__name__)
        stack += [child for child, _ in node.next_functions]
    return found


def our_name(hf_name: str) -> str:
    """HF PEFT's parameter name as peft_core spells it (no adapter name)."""
    name = hf_name.replace(".default", "")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def block_pair(dora: bool, dropout: float, dtype: torch.dtype = torch.float32):
    """(ours, HF PEFT's) LoRA or DoRA on copies of one frozen Attentionish, same adapter weights
    (B and the magnitude moved off their init so every term of the step matters)."""
    torch.manual_seed(0)
    base = Attentionish().to(dtype).requires_grad_(False)
    hf_config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=PROJECTIONS, use_dora=dora
    )
    hf = peft.inject_adapter_in_model(hf_config, copy.deepcopy(base))
    config = (DoraConfig if dora else LoraConfig)(
        r=4, alpha=8, dropout=dropout, target_modules=PROJECTIONS
    )
    ours = copy.deepcopy(base)
    (inject_dora if dora else inject_lora)(ours, config)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
                mine[our_name(name)].copy_(param)
    return ours.train(), hf.train()


def assert_near(got: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = 1e-5):
    """Within rtol relative to the tensor's norm (fp32 rounding differs element by element)."""
    error = _relative_error(got, expected.double())
    assert error <= rtol, f"{name}: relative error {error:.3g} > {rtol:g}"


def grads_of(model: nn.Module, x: torch.Tensor, seed: int = 7, autocast=None):
    """{'out', 'x', parameter names as peft_core spells them} after sin(out).sum().backward(),
    the dropout masks drawn from `seed`; and our step nodes in the graph."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        out = model(x)
    loss = out.double().sin().sum()
    loss.backward()
    grads = {"out": out.detach(), "x": x.grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grads[our_name(name)] = param.grad
    model.zero_grad(set_to_none=True)
    return grads, step_nodes(loss)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fp32_steps_give_hf_peft_gradients_with_dropout(dora, dropout):
    ours, hf = block_pair(dora, dropout)
    x = torch.randn(3, 5, 32)
    expected, hf_nodes = grads_of(hf, x)
    got, nodes = grads_of(ours, x)
    assert not hf_nodes
    # LoRA: q, k, v in one grouped step and o in its own; DoRA: one step per layer
    assert nodes.count("DoraStepBackward" if dora else "LowRankStepBackward") == (4 if dora else 2)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert_near(got[name], value, name)


def test_each_member_of_a_group_draws_its_own_mask():
    """q, k and v share x but not the dropout mask: with one shared mask ∂A_q·(A_k)… would
    agree with HF only by chance, and a different mask per call changes ∂A."""
    ours, hf = block_pair(False, 0.5)
    x = torch.randn(2, 4, 32)
    got, _ = grads_of(ours, x)
    again, _ = grads_of(ours, x, seed=8)  # other masks: other gradients for A
    assert not torch.allclose(got["q_proj.lora_A.weight"], again["q_proj.lora_A.weight"])
    expected, _ = grads_of(hf, x)
    for name in ("q_proj", "k_proj", "v_proj"):
        key = f"{name}.lora_A.weight"
        assert_near(got[key], expected[key], key)


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).norm() / reference.norm())


HALF_CASES = [
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16-base-autocast"),
    pytest.param(torch.float16, torch.float16, id="fp16-base-autocast"),
    pytest.param(torch.bfloat16, None, id="bf16-base-no-autocast"),
]


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize(("dtype", "autocast"), HALF_CASES)
def test_half_precision_steps_are_no_further_from_fp64_than_hf_peft(dora, dtype, autocast):
    """A half base with fp32 adapters (train.py's bf16/fp16), dropout on, against the same
    model computed in fp64 (same weights, same masks): summed over the output and every
    gradient, ours is no further from it than HF PEFT's. One tensor alone may land either
    side of HF's (both round the same half outputs once at the end, which dominates), so
    each is only held within 2× of HF's. The adapters' gradients come back fp32."""
    ours, hf = block_pair(dora, 0.1, dtype)
    reference_model = copy.deepcopy(hf).double()
    x = torch.randn(8, 16, 32).to(dtype)
    reference, _ = grads_of(reference_model, x.double())
    theirs, _ = grads_of(hf, x, autocast=autocast)
    got, nodes = grads_of(ours, x, autocast=autocast)
    assert len(nodes) == (4 if dora else 2)
    ours_errors = {name: _relative_error(got[name], value) for name, value in reference.items()}
    hf_errors = {name: _relative_error(theirs[name], value) for name, value in reference.items()}
    assert sum(ours_errors.values()) <= sum(hf_errors.values()), (ours_errors, hf_errors)
    for name, error in ours_errors.items():
        assert error <= 2 * hf_errors[name], f"{name}: ours {error:.3g}, HF {hf_errors[name]:.3g}"
    assert all(got[name].dtype == torch.float32 for name in got if name not in ("out", "x"))


# ---------------------------------------------------------------- tiny models


def _tiny_pair(dora: bool, dropout: float):
    """(ours, HF PEFT's) on copies of a tiny Llama, all linear layers, same adapter weights."""
    torch.manual_seed(0)
    base = build_tiny("llama")
    hf_config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", use_dora=dora
    )
    hf = peft.get_peft_model(copy.deepcopy(base), hf_config)
    with torch.no_grad():
        for param in hf.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    config = (DoraConfig if dora else LoraConfig)(
        r=4, alpha=8, dropout=dropout, target_modules="all-linear"
    )
    ours = peft_core.apply(copy.deepcopy(base), config)
    load_adapter_tensors(ours, peft.get_peft_model_state_dict(hf))
    return ours.train(), hf.train()


def _model_grads(model: nn.Module, input_ids: torch.Tensor, seed: int = 11):
    torch.manual_seed(seed)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {
        our_name(name.removeprefix("base_model.model.")): param.grad
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    model.zero_grad(set_to_none=True)
    return {"loss": loss.detach(), **grads}, step_nodes(loss)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_a_tiny_llama_step_with_dropout_matches_hf_peft(dora, input_ids):
    ours, hf = _tiny_pair(dora, 0.1)
    expected, _ = _model_grads(hf, input_ids)
    got, nodes = _model_grads(ours, input_ids)
    # 2 blocks of 7 linears: LoRA groups q,k,v and gate,up (4 steps a block), DoRA does not
    assert len(nodes) == (14 if dora else 8)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert_near(got[name], value, name)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_gradient_checkpointing_recomputes_the_same_masks(dora, input_ids):
    """transformers' non-reentrant checkpointing restores the RNG state before it recomputes a
    block, so the recomputed steps draw the masks the first forward drew: the same gradients
    as without checkpointing. Without that restoring, the gradients differ, so the comparison
    can tell."""
    plain, _ = _tiny_pair(dora, 0.2)
    expected, _ = _model_grads(plain, input_ids)
    results = {}
    for preserve in (True, False):
        model = copy.deepcopy(plain)
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": preserve}
        )
        results[preserve], nodes = _model_grads(model, input_ids)
        assert len(nodes) == (14 if dora else 8)
        groups = {m.shared_input for m in model.modules() if getattr(m, "shared_input", None)}
        assert all(group.shared and not group.pending for group in groups)
    for name, value in expected.items():
        assert_near(results[True][name], value, name)
    adapter = [name for name in expected if "lora_A" in name]
    assert any(not torch.allclose(results[False][n], expected[n]) for n in adapter)


def test_a_group_stays_shared_through_repeated_checkpointed_steps(input_ids):
    ours, _ = _tiny_pair(False, 0.1)
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for seed in range(3):
        _, nodes = _model_grads(ours, input_ids, seed=seed)
        assert len(nodes) == 8
    groups = {m.shared_input for m in ours.modules() if getattr(m, "shared_input", None)}
    assert len(groups) == 4 and all(group.shared for group in groups)


# ---------------------------------------------------------------- quantised base


def _nf4_llama(model_cache):
    from peft_core.pretrained import load_directory

    directory = catalogue.model_dir("tiny-llama", cache_dir=model_cache)
    return load_directory(directory, "causal-lm", quantize="nf4")[0].train()


def test_nf4_base_lora_step_matches_hf_peft(model_cache, input_ids):
    """LoRA on an NF4 base: x·W0ᵀ through bitsandbytes' 4-bit matmul, g·W0 against W0
    dequantised once for the product, as bitsandbytes' own backward does."""
    hf = peft.get_peft_model(
        _nf4_llama(model_cache),
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for param in hf.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    ours = peft_core.apply(
        _nf4_llama(model_cache), LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear")
    )
    load_adapter_tensors(ours, peft.get_peft_model_state_dict(hf))
    expected, _ = _model_grads(hf.train(), input_ids)
    got, nodes = _model_grads(ours.train(), input_ids)
    assert len(nodes) == 8
    for name, value in expected.items():
        assert_near(got[name], value, name)


# ---------------------------------------------------------------- where the step applies


def test_the_step_applies_where_users_train_and_not_elsewhere():
    layer = LoraLinear(nn.Linear(8, 8), r=2, alpha=4, dropout=0.05, rslora=False).train()
    x = torch.randn(2, 8)
    assert not layer.fast_path_applies(x)  # the base weight is trainable
    layer.base_layer.requires_grad_(False)
    assert layer.fast_path_applies(x)  # with dropout
    assert layer.fast_step(x).p == 0.05 and layer.eval().fast_step(x).p == 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.fast_path_applies(x)  # autocast to bf16, but W0 is fp32: plain path
    layer.base_layer.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.fast_step(x).compute == torch.bfloat16
    assert layer.fast_step(x.bfloat16()).compute == torch.bfloat16  # no autocast, half base
    assert layer.lora_A.weight.dtype == torch.float32
