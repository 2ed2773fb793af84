"""Packed batches on a model: what the model is given, and which models keep examples apart.

A packed row holds several examples end to end, its position ids restarting at 0 with each
(data.py draws one). transformers 5 keeps the examples apart from those restarts alone:
`masking_utils.find_packed_sequence_indices` numbers the examples where the positions do not
go up by 1, and `create_causal_mask` (sdpa, eager, flex) ands the causal mask with "same
example", a block-diagonal causal mask; flash-attention 2 turns the restarts into varlen
sequence bounds. It does so only when the forward gets no 2-D attention_mask and no KV cache.
So a packed batch reaches the model without its attention_mask (`model_batch`: right padding
comes after every example, so a causal mask alone never shows it to one, and the padding is a
block of its own), and while training packed the model builds no cache (`no_kv_cache`:
transformers builds one in training mode too, from config.use_cache, unless gradient
checkpointing is on).

Which models. A model must build its mask through those utilities from the position ids
it is given, and place tokens by them. Measured on tiny fp32 models (transformers 5.24):
Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, GPT-NeoX, GPT-2, GPT-J, GPTBigCode, Starcoder2
and Falcon (ALiBi too: its bias is relative, and its mask comes from the same utilities)
give an example bitwise its own logits in a packed row; OPT (its mask is built without the
position ids), Bloom and MPT (ALiBi biases and masks of their own) do not. An encoder
classifies whole rows, and prompt or prefix tuning put something before a row
(configs.refuse_packing says why). Rather than a table of families, `refuse_unpackable`
measures it on the model about to train, under the run's attention kernel and precision:
an example's logits after another in a packed row must be those of the example alone,
within 1/100 of how much the same preceding example moves them in a plain (unpacked) row.
That ratio is 0 (or float rounding) where packing works and about 1 where it does not.
"""

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from peft_core.checks import ConfigError
from peft_core.configs import refuse_packing
from peft_core.data import Example, collate, collate_packed
from peft_core.model import CONFIG_ATTR
from peft_core.registry import METHOD_CONFIGS

# How much of what a preceding example changes may be left with packing (module docstring).
LEFT_OF_CONTEXT = 0.01
# Probe rows: an example of 5 tokens after one of 7 (ids taken modulo the vocabulary).
PROBE_BEFORE = (11, 257, 3, 1021, 77, 19, 5)
PROBE_AFTER = (42, 9, 301, 13, 760)


def model_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` as the model takes it: a packed batch (it has position_ids) without its 2-D
    attention_mask, so that transformers builds the block-diagonal mask from the positions."""
    if "position_ids" not in batch:
        return batch
    return {name: tensor for name, tensor in batch.items() if name != "attention_mask"}


@contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[None]:
    """While inside, the model's forward builds no KV cache unless asked (module docstring)."""
    config = model.config
    was = getattr(config, "use_cache", None)
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = was


def refuse_unpackable(
    model: nn.Module, *, task: str, autocast: AbstractContextManager | None = None
) -> None:
    """ConfigError("packing", why) unless `model` trains packed `task` rows exactly as unpacked.

    Judges the task and the adapter's method (configs.refuse_packing), then probes the model
    (module docstring) in eval mode without gradients, under `autocast` (the run's).
    """
    method = _method_key(model)
    refuse_packing(True, method=method, task=task)
    with torch.no_grad(), no_kv_cache(model), autocast or nullcontext():
        was_training = model.training
        model.eval()
        try:
            packed_gap, context_gap = _probe(model)
        finally:
            model.train(was_training)
    if not packed_gap <= LEFT_OF_CONTEXT * context_gap:
        raise ConfigError(
            "packing",
            f"{type(model).__name__} cannot train packed: its attention does not keep the "
            "examples of a row apart (an example's logits move by "
            f"{packed_gap:.3g} when another precedes it in a packed row, {context_gap:.3g} "
            "in a plain row), as with ALiBi or a mask built without the position ids. "
            "Turn packing off",
        )


def _probe(model: nn.Module) -> tuple[float, float]:
    """(max |Δ logits| of the probe example after another in a packed row, the same in a
    plain row), both against the example alone."""
    vocab = model.get_input_embeddings().num_embeddings
    before = tuple(token % vocab for token in PROBE_BEFORE)
    after = tuple(token % vocab for token in PROBE_AFTER)
    device = next(model.parameters()).device
    first, alone = Example(before, before), Example(after, after)
    packed = collate_packed([(first, alone), (alone,)], pad_token_id=0)
    plain = collate([Example(before + after, before + after)], pad_token_id=0)
    packed_logits = _logits(model, model_batch(packed), device)
    plain_logits = _logits(model, plain, device)
    start, end = len(before), len(before) + len(after)
    reference = packed_logits[1, : len(after)]
    packed_gap = (packed_logits[0, start:end] - reference).abs().max().item()
    context_gap = (plain_logits[0, start:end] - reference).abs().max().item()
    return packed_gap, context_gap


def _logits(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device):
    inputs = {name: tensor.to(device) for name, tensor in batch.items() if name != "labels"}
    return model(**inputs).logits.float()


def _method_key(model: nn.Module) -> str | None:
    """The key (METHOD_CONFIGS) of the peft_core method applied to `model`, if any."""
    config = getattr(model, CONFIG_ATTR, None)
    return next((key for key, cls in METHOD_CONFIGS.items() if type(config) is cls), None)
