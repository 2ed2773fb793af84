"""The causal-LM loss without the batch's logits: the LM head and cross-entropy in chunks.

A causal LM's loss needs logits z = h·Wᵀ (+ b) for every token, (n, V) with n = batch ×
sequence and V the vocabulary. SmolLM2 (V = 49 152) at 8 × 512 tokens has 800 MB of fp32
logits, and the autograd of `cross_entropy(logits.float(), labels)` keeps another copy for
its backward and makes two more there: more than the whole LoRA model's activations on a
small model. Here the head and the loss run together, `CHUNK_TOKENS` rows at a time, and the
gradient is made in the same pass, so no more than CHUNK_TOKENS × V logits ever exist:

    for each chunk c of the supervised tokens (h_c (c, H), targets y_c):
        z = h_c·Wᵀ + b  in the head's dtype (bf16 under autocast), then float32
        ℓ = logsumexp(z) − z[y]                      summed into the loss
        ∂z = softmax(z) − onehot(y)                  (c, V), in place over z
        ∂h_c = ∂z·W;  ∂W += ∂zᵀ·h_c;  ∂b += Σ ∂z     (those that need a gradient)

Backward only scales the stored ∂h (n, H) (and ∂W, ∂b) by the incoming scalar. Tokens whose
label is ignored (prompt, padding) are left out before the head, so they cost nothing.
The numbers are the ones HF's loss computes (the head in the model's compute dtype, the
softmax in fp32), in another summation order.

Which models. The loss needs the model's logits to be exactly its output embedding applied
to the last hidden state. Softcapped (Gemma 2), scaled (Cohere, Granite) or otherwise
post-processed logits would not be: `chunked_loss_applies` runs the model once on a few
tokens both ways and uses the chunked loss only if the logits agree, else the model's own
full logits (the answer is kept on the model). The hidden states are read by putting a
pass-through module in the head's place for the forward (`_head_passes_hidden`), so the
whole forward of the model, adapters and virtual tokens included, runs unchanged.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from peft_core.data import IGNORE_INDEX

# Tokens per chunk: at V = 49 152 a chunk's fp32 logits are 192 MiB; at V = 152 064 (Qwen2)
# 594 MiB. Large enough that each chunk is a full-speed matmul.
CHUNK_TOKENS = 1024

_APPLIES_ATTR = "_peft_core_chunked_loss"  # cached answer of chunked_loss_applies
PROBE_TOKENS = 8


class _PassHidden(nn.Module):
    """Stands in for the LM head: returns its input, the last hidden state."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _head_path(model: nn.Module) -> str | None:
    """The module path of the model's output embedding when it is a plain Linear, else None."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear:  # an adapted or wrapped head is left to the model
        return None
    for path, module in model.named_modules():
        if module is head:
            return path
    return None


@contextmanager
def _head_passes_hidden(model: nn.Module, path: str) -> Iterator[nn.Linear]:
    """While inside, the model's forward returns its last hidden state as `logits`."""
    head = model.get_submodule(path)
    model.set_submodule(path, _PassHidden())
    try:
        yield head
    finally:
        model.set_submodule(path, head)


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in batch.items() if name != "labels"}


@torch.no_grad()
def chunked_loss_applies(model: nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """Whether the model's logits are its head applied to the last hidden state (see module doc).

    Asked once per model on the first row of `batch` (a few tokens, eval mode, no gradient);
    the answer is kept on the model.
    """
    known = getattr(model, _APPLIES_ATTR, None)
    if known is not None:
        return known
    path = _head_path(model)
    applies = False
    if path is not None:
        probe = {
            name: tensor[:1, :PROBE_TOKENS]
            for name, tensor in _model_inputs(batch).items()
            if tensor.dim() == 2
        }
        was_training = model.training
        model.eval()
        try:
            logits = model(**probe).logits
            with _head_passes_hidden(model, path) as head:
                hidden = model(**probe).logits
                applies = hidden.shape[-1] == head.in_features and torch.allclose(
                    head(hidden.to(head.weight.dtype)).float(), logits.float(), rtol=1e-4, atol=1e-4
                )
        finally:
            model.train(was_training)
    setattr(model, _APPLIES_ATTR, applies)
    return applies


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed loss over the batch's supervised tokens, their count) for a causal LM batch.

    Position t predicts token t + 1; labels equal to IGNORE_INDEX are not supervised. Uses the
    chunked head where `chunked_loss_applies`, the model's full logits elsewhere.
    """
    labels = batch["labels"][:, 1:]  # (B, T − 1): what positions 0 … T − 2 predict
    if not chunked_loss_applies(model, batch):
        logits = model(**_model_inputs(batch)).logits[:, :-1]
        targets = labels.reshape(-1)
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            targets,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss, int((targets != IGNORE_INDEX).sum())
    with _head_passes_hidden(model, _head_path(model)) as head:
        hidden = model(**_model_inputs(batch)).logits[:, :-1]  # (B, T − 1, H)
    supervised = (labels != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)
    hidden = hidden.reshape(-1, hidden.size(-1)).index_select(0, supervised)  # (n, H)
    targets = labels.reshape(-1).index_select(0, supervised)  # (n,)
    if torch.is_grad_enabled():
        loss = LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets)
    else:
        loss = _head_and_loss(hidden, head.weight, head.bias, targets)[0]
    return loss, int(supervised.numel())


def _head_and_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    wanted: tuple[bool, bool, bool] = (False, False, False),
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The module doc's loop: (summed loss, ∂h, ∂W, ∂b), a gradient only where `wanted`."""
    want_h, want_w, want_b = wanted
    acc = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 for an fp64 head
    total = torch.zeros((), dtype=acc, device=hidden.device)
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = torch.zeros_like(weight, dtype=acc) if want_w else None
    grad_b = torch.zeros_like(bias, dtype=acc) if want_b else None
    for start in range(0, hidden.shape[0], CHUNK_TOKENS):
        h = hidden[start : start + CHUNK_TOKENS]  # (c, H)
        y = targets[start : start + CHUNK_TOKENS]  # (c,)
        z = F.linear(h, weight, bias).to(acc)  # (c, V)
        lse = torch.logsumexp(z, dim=-1)  # (c,)
        total += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
        if not any(wanted):
            continue
        grad_z = z.sub_(lse[:, None]).exp_()  # softmax, over z's memory
        grad_z[torch.arange(len(y), device=y.device), y] -= 1.0
        if want_h:
            grad_h[start : start + CHUNK_TOKENS] = grad_z.to(weight.dtype) @ weight
        if want_w:
            grad_w += grad_z.T @ h.to(acc)
        if want_b:
            grad_b += grad_z.sum(0)
    return total, grad_h, grad_w, grad_b


class LinearCrossEntropy(torch.autograd.Function):
    """Σ_i cross_entropy(h_i·Wᵀ + b, y_i) over rows of h (n, H), CHUNK_TOKENS rows at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):  # noqa: ANN001, ANN205
        wanted = tuple(ctx.needs_input_grad[:3])
        total, *grads = _head_and_loss(hidden, weight, bias, targets, wanted)
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: ANN001, ANN205
        scaled = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.saved_tensors]
        return *scaled, None
