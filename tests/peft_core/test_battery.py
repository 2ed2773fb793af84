"""The battery every PEFT method passes, on tiny Llama, GPT-2 and BERT (method_cases.py).

Identity at init where the math says so; only adapter parameters change after a step;
trainable counts equal the closed-form formulas; merged == unmerged for mergeable methods
(a clear error otherwise); save -> load reproduces outputs; `disabled` gives the base model;
bf16 forward is finite; generate() works for causal LMs; training works with gradient
checkpointing switched on.
"""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import peft_core
from peft_core.tiny import build_tiny
from tests.peft_core.method_cases import CASES
from tests.peft_core.test_lora import loss_of, perturb

PARAMS = [
    pytest.param(case, kind, task, id=f"{case.id}-{kind}-{task}")
    for case in CASES
    for kind, task in case.architectures
]


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _adapted(case, kind: str, task: str) -> nn.Module:
    torch.manual_seed(0)
    return peft_core.apply(build_tiny(kind, task), case.config(kind, task))


def _head_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".trained_module." in n)


# Prompt and prefix tuning (and MAM) attend to random virtual tokens from the start: by
# design they are not the identity at init, so they are not parametrised here.
@pytest.mark.parametrize(
    ("case", "kind", "task"), [p for p in PARAMS if p.values[0].identity_at_init]
)
def test_identity_at_init(case, kind, task, input_ids):
    base = _logits(build_tiny(kind, task), input_ids)
    assert_close(_logits(_adapted(case, kind, task), input_ids), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("case", "kind", "task"), PARAMS)
def test_trainable_count_matches_the_formula(case, kind, task):
    model = _adapted(case, kind, task)
    expected = case.expected_params(kind, task) + _head_params(model)
    assert peft_core.trainable_parameters(model) == expected


@pytest.mark.parametrize(("case", "kind", "task"), PARAMS)
def test_only_adapter_params_change_after_a_step(case, kind, task, input_ids):
    model = _adapted(case, kind, task)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss_of(model, input_ids, task).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable


@pytest.mark.parametrize(("case", "kind", "task"), PARAMS)
def test_merge_matches_unmerged_or_is_refused(case, kind, task, input_ids):
    model = _adapted(case, kind, task)
    perturb(model)
    model.eval()
    unmerged = _logits(model, input_ids)
    if not case.mergeable:
        with pytest.raises(ValueError, match="cannot be merged"):
            peft_core.merge(model)
        return
    peft_core.merge(model)
    assert_close(_logits(model, input_ids), unmerged, atol=1e-5, rtol=0)
    peft_core.unmerge(model)
    assert_close(_logits(model, input_ids), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("case", "kind", "task"), PARAMS)
def test_disabled_gives_the_base_model(case, kind, task, input_ids):
    base = _logits(build_tiny(kind, task), input_ids)
    model = _adapted(case, kind, task)
    perturb(model)
    model.eval()
    adapted = _logits(model, input_ids)
    assert not torch.allclose(adapted, base, atol=1e-4)
    with peft_core.disabled(model):
        assert_close(_logits(model, input_ids), base, atol=1e-6, rtol=0)
    assert_close(_logits(model, input_ids), adapted, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("case", "kind", "task"), PARAMS)
def test_save_then_load_reproduces_outputs(case, kind, task, input_ids, tmp_path):
    model = _adapted(case, kind, task)
    perturb(model)
    model.eval()
    expected = _logits(model, input_ids)
    peft_core.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = peft_core.load_adapter(build_tiny(kind, task), tmp_path).eval()
    assert_close(_logits(loaded, input_ids), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("case", "kind", "task"), PARAMS)
def test_bf16_forward_is_finite(case, kind, task, input_ids):
    model = _adapted(case, kind, task)
    perturb(model)
    model.to(torch.bfloat16).eval()
    assert torch.isfinite(_logits(model, input_ids).float()).all()


@pytest.mark.parametrize(
    ("case", "kind", "task"), [p for p in PARAMS if p.values[2] == "causal-lm"]
)
def test_generate_works(case, kind, task, input_ids):
    model = _adapted(case, kind, task)
    perturb(model)
    model.eval()
    attention_mask = torch.ones_like(input_ids)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
    )
    assert out.shape == (input_ids.shape[0], input_ids.shape[1] + 5)
    assert torch.equal(out[:, : input_ids.shape[1]], input_ids)
    # Greedy decoding agrees with the adapted model's own next-token argmax.
    first = _logits(model, input_ids)[:, -1].argmax(-1)
    assert torch.equal(out[:, input_ids.shape[1]], first)


@pytest.mark.parametrize(("case", "kind", "task"), PARAMS)
def test_trains_with_gradient_checkpointing(case, kind, task, input_ids):
    model = _adapted(case, kind, task)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss = loss_of(model, input_ids, task)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss)
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
