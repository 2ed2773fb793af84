"""The families the structure tests run on, and two models no table of ours names.

FAMILY_CASES: every kind of peft_core.tiny.FAMILIES with its task (encoders classify), plus
Starcoder2 (a transformers family absent from peft_core and from HF PEFT's default tables).
`fresh(kind, task)` is a deep copy of one seeded build per (kind, task): building a tiny model
runs its weight init, copying does not. `Toy` is a transformer written here with names no
table knows (trunk, mix.to_queries, ff.widen, ...) whose attention takes its cache as
`memory`; `toy(...)` builds ambiguous variants of it.
"""

import copy
import functools

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutput

from peft_core.tiny import ENCODERS, FAMILIES, SEED, build_tiny

UNLISTED = "starcoder2"
FAMILY_CASES = [
    (kind, "seq-cls" if kind in ENCODERS else "causal-lm") for kind in (*FAMILIES, UNLISTED)
]


def _starcoder2() -> nn.Module:
    config = transformers.Starcoder2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        residual_dropout=0.0,
        embedding_dropout=0.0,
        attention_dropout=0.0,
        sliding_window=None,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@functools.cache
def _built(kind: str, task: str) -> nn.Module:
    return _starcoder2() if kind == UNLISTED else build_tiny(kind, task)


def fresh(kind: str, task: str) -> nn.Module:
    """A tiny seeded `kind` model for `task`, in eval mode, never shared with another test."""
    return copy.deepcopy(_built(kind, task))


# ---------------------------------------------------------------- a model of our own


class ToyConfig(transformers.PretrainedConfig):
    model_type = "toy"

    def __init__(self, vocab_size=512, hidden_size=64, num_hidden_layers=2, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers = num_hidden_layers


class Mixer(nn.Module):
    """Causal grouped-query attention, 4 query heads and 2 key/value heads of 16."""

    def __init__(self, d: int, index: int):
        super().__init__()
        self.index, self.heads, self.kv_heads, self.head_dim = index, 4, 2, d // 4
        self.to_queries = nn.Linear(d, d)
        self.to_keys = nn.Linear(d, d // 2)
        self.to_values = nn.Linear(d, d // 2)
        self.merge = nn.Linear(d, d)

    def split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(*x.shape[:2], heads, self.head_dim).transpose(1, 2)  # (b, h, t, d_h)

    def forward(self, x, attention_mask=None, memory=None):
        q = self.split(self.to_queries(x), self.heads)
        k = self.split(self.to_keys(x), self.kv_heads)
        v = self.split(self.to_values(x), self.kv_heads)
        if memory is not None:
            k, v = memory.update(k, v, self.index)
        k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))
        causal = attention_mask is None and x.shape[1] > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=causal)
        return self.merge(out.transpose(1, 2).reshape(x.shape))


class Feed(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.widen, self.narrow = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.narrow(F.gelu(self.widen(x)))


class Cell(nn.Module):
    def __init__(self, d: int, index: int, twin: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mix, self.ff = Mixer(d, index), Feed(d)
        self.twin = Mixer(d, index) if twin else None  # a second attention: ambiguous

    def forward(self, h, mask, cache):
        h = h + self.mix(self.norm1(h), attention_mask=mask, memory=cache)
        if self.twin is not None:
            h = h + self.twin(self.norm1(h), attention_mask=mask, memory=cache)
        return h + self.ff(self.norm2(h))


class Toy(nn.Module):
    """A decoder whose module names no table of ours (or HF PEFT's) holds."""

    def __init__(self, twin: bool = False, spare: bool = False):
        super().__init__()
        self.config = ToyConfig()
        d, layers = self.config.hidden_size, self.config.num_hidden_layers
        self.embed = nn.Embedding(self.config.vocab_size, d)
        self.trunk = nn.ModuleList([Cell(d, i, twin) for i in range(layers)])
        # a second ModuleList of L Linear-holding modules: which are the blocks?
        self.spare = nn.ModuleList([nn.Linear(d, d) for _ in range(layers)]) if spare else None
        self.unembed = nn.Linear(d, self.config.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.unembed

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None
    ):
        h = self.embed(input_ids)
        for cell in self.trunk:
            h = cell(h, None, cache)  # causal; a 2-D padding mask is not used here
        return CausalLMOutput(logits=self.unembed(h))


def toy(**variant: bool) -> Toy:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return Toy(**variant).eval()
