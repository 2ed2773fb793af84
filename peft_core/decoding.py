"""Greedy decoding of a batch of prompts: what the generation metrics score (task_metrics.py)
and what the run page's sample answers show (profile.sample_generations).

Prompts are formatted exactly as training formats them (data.prompt_ids: the chat template's
generation prompt, or the prompt and a newline) and left-padded into one (B, T) batch, so
every row's last prompt token sits in the last column and the first new token of every row
comes from the same step:

    input_ids       p  p  a0 a1 a2        (p padding; mask 0 there)
                    b0 b1 b2 b3 b4
    new tokens      a3 a4 </s> p  p       (a row that emitted eos is padded from there on)
                    b5 b6 b7  b8 </s>

transformers' generate() numbers each row's positions from its attention mask, so a padded
row computes what it would alone. It ends when every row has emitted eos or after
max_new_tokens; each answer is cut at its first eos and decoded without special tokens.

Methods that add virtual tokens (prompt tuning, prefix tuning, MAM) generate through their
own hooks: the virtual tokens are a filled KV cache in front of the padded row, and the mask
grows by their count (prompt_tuning.py, prefix_tuning.py).

Under FSDP (distributed.is_sharded) every forward gathers each block's weights from all
ranks, so every rank must run the same number of forwards: generate(synced_gpus=True) keeps a
finished rank stepping (its output ignored) until all ranks are done, and the caller gives a
rank without rows one row to run (train.generation_metrics).
"""

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from peft_core.configs import DEFAULT_MAX_NEW_TOKENS
from peft_core.data import prompt_ids


def left_padded(
    sequences: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T): each sequence at the right, padding before."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


@torch.no_grad()
def greedy_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    synced: bool = False,
) -> list[str]:
    """The greedy answer to each prompt, generated as one batch (module docstring).

    `synced`: under FSDP, keep stepping until every rank's batch is done.
    """
    answers = greedy_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, synced=synced)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers]


@torch.no_grad()
def greedy_ids(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    synced: bool = False,
) -> list[list[int]]:
    """greedy_completions' answers as token ids, each up to (not including) its first eos."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, attention_mask = left_padded([prompt_ids(tokenizer, p) for p in prompts], pad)
    was_training = model.training
    model.eval()
    try:
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced,
            use_cache=True,  # a packed run turns the cache off for training (packing.py)
        )
    finally:
        model.train(was_training)
    new_tokens = output[:, input_ids.shape[1] :].tolist()
    return [until_eos(ids, tokenizer.eos_token_id) for ids in new_tokens]


def until_eos(ids: list[int], eos: int | None) -> list[int]:
    """`ids` up to (not including) the first eos: the rest is generate()'s padding."""
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids
