"""Tiny random models of every family peft_core supports, for tests and smoke runs.

Every model is float32, has dropout off and is built under a fixed seed inside
`torch.random.fork_rng`, so the same call gives the same weights whatever the
caller did to the global RNG before, and the caller's RNG is left untouched.

Sizes (all): hidden 64, 2 layers, 4 heads, FFN width 128, vocab 512. Token id 0 is
the padding id. `FAMILIES` maps a kind to its config builder; each exercises its
family's attention layout:

    llama mistral qwen2 qwen3   grouped-query attention, 2 key/value heads (d_kv 32)
    gemma2 gemma3_text          GQA with head_dim 32 (q_proj 64 -> 128, not 64)
    phi3                        fused qkv_proj (64 -> 128) and gate_up_proj
    gpt_neox                    fused query_key_value, parallel residual
    gpt2                        fused Conv1D c_attn (64 -> 192)
    falcon                      fused query_key_value, multi-query (1 key/value head)
    falcon-new                  new decoder architecture: 2 key/value groups, cached broadcast
    opt                         fc1 / fc2 in the block itself (no FFN module)
    bert roberta deberta-v2     encoders (sequence classification only); DeBERTa-v2 with
                                disentangled relative attention (p2c|c2p, shared keys)

Sliding-window layers (Mistral off, Gemma on) get a window of 32, wider than any test input.
"""

from collections.abc import Callable
from typing import Any

import torch
import transformers
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


DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "max_position_embeddings": MAX_POSITIONS,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
GQA = {**DECODER, "intermediate_size": FFN, "num_key_value_heads": KV_HEADS}
GEMMA = {**GQA, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 32}
ENCODER = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": FFN,
    "max_position_embeddings": MAX_POSITIONS,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "pad_token_id": 0,
}
FALCON = {**DECODER, "ffn_hidden_size": FFN, "attention_dropout": 0.0, "hidden_dropout": 0.0}


def _falcon(**layout: Any) -> Callable[[], PretrainedConfig]:
    return lambda: transformers.FalconConfig(**FALCON, **layout)


# kind -> its tiny config (the module docstring says what each exercises).
FAMILIES: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: tiny_llama_config(),
    "mistral": lambda: transformers.MistralConfig(**GQA, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**GQA),
    "qwen3": lambda: transformers.Qwen3Config(**GQA, head_dim=HIDDEN // HEADS),
    "gemma2": lambda: transformers.Gemma2Config(**GEMMA),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**GEMMA),
    "phi3": lambda: transformers.Phi3Config(
        **GQA, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **DECODER, intermediate_size=FFN, hidden_dropout=0.0, attention_dropout=0.0
    ),
    "gpt2": lambda: tiny_gpt2_config(),
    "falcon": _falcon(multi_query=True, new_decoder_architecture=False),
    "falcon-new": _falcon(new_decoder_architecture=True, num_kv_heads=KV_HEADS),
    "opt": lambda: transformers.OPTConfig(
        **DECODER, ffn_dim=FFN, word_embed_proj_dim=HIDDEN, dropout=0.0, attention_dropout=0.0
    ),
    "bert": lambda: tiny_bert_config(),
    "roberta": lambda: transformers.RobertaConfig(**ENCODER),
    "deberta-v2": lambda: transformers.DebertaV2Config(
        **ENCODER,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=16,
        share_att_key=True,
        norm_rel_ebd="layer_norm",
        position_biased_input=False,
        pooler_dropout=0.0,
    ),
}
ENCODERS = ("bert", "roberta", "deberta-v2")


def tiny_config(kind: str, vocab_size: int = VOCAB) -> PretrainedConfig:
    if kind not in FAMILIES:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(FAMILIES)}")
    config = FAMILIES[kind]()
    config.vocab_size = vocab_size
    return config


def build_tiny(
    kind: str, task: str = "causal-lm", num_labels: int = 2, vocab_size: int = VOCAB
) -> nn.Module:
    """A seeded random `kind` model for `task` ("causal-lm" or "seq-cls"), in eval mode."""
    config = tiny_config(kind, vocab_size)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "causal-lm" and kind in ENCODERS:
        raise ValueError(f"tiny {kind} is an encoder: use task='seq-cls'")
    if task == "seq-cls":
        config.num_labels = num_labels
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = auto.from_config(config, dtype=torch.float32)
    return model.eval()
