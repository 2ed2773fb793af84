"""Tiny random Llama, GPT-2 and BERT models for tests and smoke runs.

Every model is float32, has dropout off and is built under a fixed seed inside
`torch.random.fork_rng`, so the same call gives the same weights whatever the
caller did to the global RNG before, and the caller's RNG is left untouched.

Sizes (all three): hidden 64, 2 layers, 4 heads, FFN width 128, vocab 512.
Llama uses 2 key/value heads, so grouped-query attention is exercised
(k_proj/v_proj: 64 -> 32). Token id 0 is the padding id.
"""

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
)

from peft_core.data import TASKS

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
FFN = 128
MAX_POSITIONS = 128
VOCAB = 512
SEED = 0

KINDS = ("llama", "gpt2", "bert")


def tiny_llama_config(vocab_size: int = VOCAB) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def tiny_gpt2_config(vocab_size: int = VOCAB) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=FFN,
        n_positions=MAX_POSITIONS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_bert_config(vocab_size: int = VOCAB) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POSITIONS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )


_CONFIGS = {"llama": tiny_llama_config, "gpt2": tiny_gpt2_config, "bert": tiny_bert_config}


def tiny_config(kind: str, vocab_size: int = VOCAB) -> PretrainedConfig:
    if kind not in _CONFIGS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(KINDS)}")
    return _CONFIGS[kind](vocab_size)


def build_tiny(
    kind: str, task: str = "causal-lm", num_labels: int = 2, vocab_size: int = VOCAB
) -> nn.Module:
    """A seeded random `kind` model for `task` ("causal-lm" or "seq-cls"), in eval mode."""
    config = tiny_config(kind, vocab_size)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "causal-lm" and kind == "bert":
        raise ValueError("tiny bert is an encoder: use task='seq-cls'")
    if task == "seq-cls":
        config.num_labels = num_labels
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = auto.from_config(config, dtype=torch.float32)
    return model.eval()
