"""The chunked LM head + cross-entropy (peft_core.loss) against the model's own loss."""

import pytest
import torch
from torch.nn import functional as F

import peft_core as pc
from peft_core import loss as chunked
from peft_core.data import IGNORE_INDEX
from peft_core.tiny import build_tiny

VOCAB = 512


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """A few tokens per chunk, so every batch here runs through several chunks."""
    monkeypatch.setattr(chunked, "CHUNK_TOKENS", 5)


def _batch(rows: int = 3, length: int = 9) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0  # a padded row
    labels = input_ids.clone()
    labels[:, :3] = IGNORE_INDEX  # the prompt is not supervised
    labels[attention_mask == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _adapted(kind: str, config) -> torch.nn.Module:
    model = pc.apply(build_tiny(kind), config)
    for name, param in model.named_parameters():
        if name.endswith("lora_B.weight"):  # B = 0 would leave A without a gradient
            torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(2))
    return model.train()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _compare(model: torch.nn.Module, batch: dict[str, torch.Tensor], rtol: float = 1e-5):
    """Our mean loss and its gradients against the model's own (HF's) loss."""
    theirs = model(**batch).loss
    theirs.backward()
    their_grads = _grads(model)
    summed, count = chunked.causal_lm_loss(model, batch)
    ours = summed / count
    ours.backward()
    our_grads = _grads(model)
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=0)
    assert our_grads.keys() == their_grads.keys() and our_grads
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=rtol, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_chunked_loss_equals_the_models_own_loss_and_gradients(kind):
    model = _adapted(kind, pc.LoraConfig(r=4, dropout=0.0, target_modules="all-linear"))
    batch = _batch()
    assert chunked.chunked_loss_applies(model, batch)
    _compare(model, batch)


def test_prompt_tuning_virtual_tokens_leave_the_loss_equal():
    model = _adapted("llama", pc.PromptTuningConfig(num_virtual_tokens=3))
    batch = _batch()
    assert chunked.chunked_loss_applies(model, batch)
    _compare(model, batch)


def test_softcapped_logits_use_the_models_full_logits():
    """Gemma 2 caps its logits after the head: the probe sees it and the model's loss is used."""
    model = _adapted("gemma2", pc.LoraConfig(r=4, dropout=0.0))
    assert model.config.final_logit_softcapping  # the tiny Gemma 2 really caps
    batch = _batch()
    assert not chunked.chunked_loss_applies(model, batch)
    _compare(model, batch)


def test_no_batch_by_vocabulary_tensor_is_kept_for_backward():
    """The point of the chunks: autograd keeps nothing with a row per token and a column per
    vocabulary entry, where the model's own loss keeps the logits (and their log-softmax)."""
    model = _adapted("llama", pc.LoraConfig(r=4, dropout=0.0))
    batch = _batch(rows=4, length=16)
    kept: list[torch.Size] = []

    def keep(tensor):
        kept.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(**batch).loss.backward()
    assert any(shape[-1] == VOCAB and shape.numel() >= 4 * 15 * VOCAB for shape in kept)
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        summed, count = chunked.causal_lm_loss(model, batch)
        (summed / count).backward()
    assert kept  # the adapters' backward still saves its inputs
    assert not [shape for shape in kept if shape[-1] == VOCAB]  # but no logits, nor any per token


def test_a_trainable_head_with_bias_gets_the_gradients_of_cross_entropy():
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(13, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 40, (13,), generator=generator)
    ours = chunked.LinearCrossEntropy.apply(hidden, weight, bias, targets)
    theirs = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    our_grads = torch.autograd.grad(ours * 0.5, (hidden, weight, bias))
    their_grads = torch.autograd.grad(theirs * 0.5, (hidden, weight, bias))
    for our, their in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(our, their, rtol=1e-10, atol=1e-12)


def test_under_autocast_on_a_bf16_base_the_loss_is_the_models_own():
    model = build_tiny("llama").to(torch.bfloat16)
    model = pc.apply(model, pc.LoraConfig(r=4, dropout=0.0)).train()
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = model(**batch).loss
        summed, count = chunked.causal_lm_loss(model, batch)
    # the same bf16 head products, summed in another order in fp32
    torch.testing.assert_close(summed / count, theirs.float(), rtol=1e-3, atol=0)


def test_eval_without_gradient_gives_the_same_sum():
    model = _adapted("llama", pc.LoraConfig(r=4, dropout=0.0)).eval()
    batch = _batch()
    with_grad, count = chunked.causal_lm_loss(model, batch)
    with torch.no_grad():
        without, same_count = chunked.causal_lm_loss(model, batch)
    assert count == same_count
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)
