"""Prefix tuning: p trainable key/value pairs in front of every attention layer's own.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
arXiv:2101.00190. Layer l's attention reads a learned prefix before the real keys/values:

    attn_l = softmax(Q·[P_k^l ; K]ᵀ / √d_h)·[P_v^l ; V]     P_k^l, P_v^l: (n_kv, p, d_h)

All prefixes form one table P: (p, L·2·d_kv), d_kv = n_kv·d_h, each row laid out as
[layer 0 keys | layer 0 values | layer 1 keys | …], each block heads-major (n_kv, d_h): HF
PEFT's layout. Grouped-query attention stores its n_kv key/value heads only.

Reparameterisation while training (eq. 5, `projection_dim` = h):
    P = MLP(E),   E: (p, d),   MLP = Linear(d, h) · tanh · Linear(h, L·2·d_kv)
Saving keeps P only (HF PEFT's `prompt_embeddings`, `prefix_projection: false`): a loaded
adapter is the plain table, and HF PEFT loads it directly.

As in HF PEFT, where P is a p-token past, real tokens take positions p.. and the prefix
is visible to every query; prefix keys are not rotated (RoPE). Sequence classification
pools a real token (BERT: the first one). Causal LMs get logits for the real tokens only.

Mechanism: a forward pre-hook on each self-attention (targets.SELF_ATTENTION) hands it a
stand-in for its KV cache whose update() returns [P^l ; keys], and gives its attention mask
p visible columns in front; a pre-hook on the body shifts positions by p. A real KV cache
stores the real tokens only, so generate()'s bookkeeping is untouched, and nothing crosses
a forward as state, so gradient checkpointing's recomputation sees the same prefix (HF PEFT
0.21 passes P as the past, which checkpointed layers drop: a key-length mismatch).
Cost per layer and call: one concatenation of P^l with the layer's keys and values; with
the MLP, its hidden layer (p × h) is recomputed per layer (p·d·h flops) to stay stateless.

Init: P = the keys and values the frozen model itself computes for p random vocabulary
tokens, where the model returns a KV cache (the decoders): the paper (§7.2) finds
activations of real words train better than random vectors, and measured on SmolLM2 (p=20,
10 steps) eval loss goes 2.30 -> 2.01 from this init but 8.20 -> 6.49 from HF PEFT's
N(0, 1), which swamps a pretrained model's own keys. Encoders without a cache keep
P ~ N(0, 1). With the MLP, E ~ N(0, 1) and PyTorch's Linear init. Trainable parameters: p·L·2·d_kv; with the MLP
p·d + (d·h + h) + (h·L·2·d_kv + L·2·d_kv).
PrefixTuningConfig lives in configs.py (torch-free: the web judges values with it),
re-exported here.
"""

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import EncoderDecoderCache

from peft_core.configs import PrefixTuningConfig
from peft_core.methods import Method
from peft_core.prompt_tuning import body_kwargs, refuse_encoder_decoder
from peft_core.targets import SELF_ATTENTION, model_type

ENCODER = "prefix_encoder"
EMBEDDING_KEY = f"{ENCODER}.embedding"
HF_KEY = "prompt_embeddings"


class PrefixEncoder(nn.Module):
    """P (p, L·2·d_kv), or E (p, d) and the MLP that computes it."""

    def __init__(self, p: int, layers: int, kv_heads: int, head_dim: int, d: int, h: int | None):
        super().__init__()
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        width = layers * 2 * kv_heads * head_dim
        if h is None:
            self.embedding = nn.Parameter(torch.randn(p, width))  # P
            self.transform = None
        else:
            self.embedding = nn.Parameter(torch.randn(p, d))  # E
            self.transform = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, width))
        self.disabled = False
        self.merged = False

    def _layer_rows(self, layer: int) -> torch.Tensor:
        """P's columns for one layer: (p, 2·d_kv)."""
        width = 2 * self.kv_heads * self.head_dim
        cols = slice(layer * width, (layer + 1) * width)
        if self.transform is None:
            return self.embedding[:, cols]
        hidden = self.transform[1](self.transform[0](self.embedding))  # (p, h)
        out = self.transform[2]
        return F.linear(hidden, out.weight[cols], out.bias[cols])

    def layer_prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s prefix keys and values, each (n_kv, p, d_h)."""
        rows = self._layer_rows(layer)
        kv = rows.view(rows.shape[0], 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]

    def table(self) -> torch.Tensor:
        """P (p, L·2·d_kv), built from exactly what the attention layers read."""
        if self.transform is None:
            return self.embedding
        return torch.cat([self._layer_rows(layer) for layer in range(self.layers)], dim=1)

    def shift_positions(self, body: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Body pre-hook: real tokens at positions p.. (past the prefix)."""
        if self.disabled:
            return None
        kwargs = body_kwargs(args, kwargs)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = _default_positions(kwargs)
        kwargs["position_ids"] = positions + self.embedding.shape[0]
        return (), kwargs


def _default_positions(kwargs: dict[str, Any]) -> torch.Tensor:
    """What the body would use: past + 0..n-1, (1, n)."""
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs["inputs_embeds"]
    cache = kwargs.get("cache")
    past = cache.get_seq_length() if cache is not None else 0
    return torch.arange(past, past + tokens.shape[1], device=tokens.device).unsqueeze(0)


class PrefixedCache:
    """Stands in for one attention call's KV cache: update() returns [prefix ; keys/values].

    The real cache (if any) is updated with, and keeps, the real tokens only.
    """

    def __init__(self, cache: Any, keys: torch.Tensor, values: torch.Tensor):
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        self.cache, self.keys, self.values = cache, keys, values  # (n_kv, p, d_h)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.cache is not None:
            keys, values = self.cache.update(keys, values, layer_idx, *args, **kwargs)
        return _prepend(self.keys, keys), _prepend(self.values, values)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["cache"], name)


def _prepend(prefix: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """(n_kv, p, d_h) before (b, n_kv, t, d_h) -> (b, n_kv, p + t, d_h)."""
    prefix = prefix.to(states.dtype).expand(states.shape[0], -1, -1, -1)
    return torch.cat([prefix, states], dim=2)


def prefixed_mask(
    mask: torch.Tensor | None, attention: nn.Module, p: int, hidden: torch.Tensor, past: int
) -> torch.Tensor | None:
    """The attention mask with p visible key columns in front, for queries `hidden` (b, t, d).

    None stays None where it means "see every key" (bidirectional, one query, flash
    attention's bottom-right causal); a causal None becomes an explicit mask, since SDPA's
    is_causal aligns top-left and the keys outnumber the queries.
    """
    if mask is not None:
        visible = True if mask.dtype == torch.bool else (1 if mask.ndim == 2 else 0)
        front = torch.full((*mask.shape[:-1], p), visible, dtype=mask.dtype, device=mask.device)
        return torch.cat([front, mask], dim=-1)
    implementation = attention.config._attn_implementation
    queries = hidden.shape[1]
    if not getattr(attention, "is_causal", False) or queries == 1 or "flash" in implementation:
        return None
    ones = {"dtype": torch.bool, "device": hidden.device}
    causal = torch.ones(queries, past + queries, **ones).tril(diagonal=past)
    allowed = torch.cat([torch.ones(queries, p, **ones), causal], dim=1)[None, None]  # (1,1,t,p+k)
    if implementation == "sdpa":
        return allowed
    additive = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
    return additive.masked_fill(~allowed, torch.finfo(hidden.dtype).min)


class AttentionPrefix:
    """Forward pre-hook of layer `layer`'s self-attention: the prefix through its cache and mask."""

    def __init__(self, encoder: PrefixEncoder, layer: int):
        self.encoder, self.layer = encoder, layer

    def __call__(self, attention: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if self.encoder.disabled:
            return None
        kwargs = dict(kwargs)
        if "past_key_values" in kwargs:  # transformers 5's deprecated name for `cache`
            kwargs["cache"] = kwargs.pop("past_key_values")
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache")
        past = cache.get_seq_length(attention.layer_idx) if cache is not None else 0
        p = self.encoder.embedding.shape[0]
        mask = kwargs.get("attention_mask")
        kwargs["attention_mask"] = prefixed_mask(mask, attention, p, hidden, past)
        kwargs["cache"] = PrefixedCache(cache, *self.encoder.layer_prefix(self.layer))
        return args, kwargs


# ---------------------------------------------------------------- inject


def self_attention_paths(model: nn.Module) -> list[str]:
    """Each block's self-attention module, in layer order."""
    kind = model_type(model)
    if kind not in SELF_ATTENTION:
        known = ", ".join(SELF_ATTENTION)
        raise ValueError(f"prefix tuning does not know model type {kind!r} (known: {known})")
    blocks, inside = SELF_ATTENTION[kind]
    pattern = re.compile(rf"(.*\.)?{blocks}\.\d+\.{re.escape(inside)}")
    return [path for path, _ in model.named_modules() if pattern.fullmatch(path)]


def kv_geometry(config: Any) -> tuple[int, int]:
    """(n_kv, d_h): key/value heads and head width, as HF PEFT derives them."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def inject_prefix_tuning(model: nn.Module, config: PrefixTuningConfig) -> list[str]:
    """Attach `model.prefix_encoder` and hook it into every self-attention; returns their paths.

    Composable: it adds one module and hooks, and leaves every path of the model as it was
    (MAM adds a parallel adapter beside it).
    """
    if hasattr(model, ENCODER):
        raise ValueError("this model already has a prefix")
    paths = self_attention_paths(model)
    if len(paths) != model.config.num_hidden_layers:
        raise ValueError(f"found {len(paths)} self-attention modules, expected one per layer")
    kv_heads, head_dim = kv_geometry(model.config)
    weight = model.get_input_embeddings().weight
    dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
    sizes = (config.num_virtual_tokens, len(paths), kv_heads, head_dim, weight.shape[1])
    encoder = PrefixEncoder(*sizes, config.projection_dim).to(device=weight.device, dtype=dtype)
    model.add_module(ENCODER, encoder)
    model.base_model.register_forward_pre_hook(encoder.shift_positions, with_kwargs=True)
    for layer, path in enumerate(paths):
        attention = model.get_submodule(path)
        attention.register_forward_pre_hook(AttentionPrefix(encoder, layer), with_kwargs=True)
    if encoder.transform is None:
        init_from_real_tokens(model, encoder)
    return paths


@torch.no_grad()
def init_from_real_tokens(model: nn.Module, encoder: PrefixEncoder, seed: int = 0) -> None:
    """P := the frozen model's own keys/values for p random vocabulary tokens (see Init)."""
    p = encoder.embedding.shape[0]
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, p), generator=generator).to(encoder.embedding.device)
    was_training, encoder.disabled = model.training, True
    try:
        model.eval()
        cache = getattr(model(input_ids=ids, use_cache=True), "past_key_values", None)
    finally:
        encoder.disabled = False
        model.train(was_training)
    if cache is None or not hasattr(cache, "layers"):
        return  # an encoder: no cache to read, P stays random
    blocks = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
    # (2, n_kv, p, d_h) per layer -> rows (p, 2·n_kv·d_h): P's per-layer column block.
    rows = [block.permute(2, 0, 1, 3).reshape(p, -1) for block in blocks]
    encoder.embedding.copy_(torch.cat(rows, dim=1))


def prefix_encoder(model: nn.Module) -> PrefixEncoder:
    return getattr(model, ENCODER)


# ---------------------------------------------------------------- HF PEFT format


def to_hf_config(model: nn.Module, config: PrefixTuningConfig) -> dict[str, Any]:
    """Prefix tuning's keys of adapter_config.json: always the plain table (no projection)."""
    encoder = prefix_encoder(model)
    token_dim = encoder.kv_heads * encoder.head_dim  # HF PEFT's token_dim is d_kv
    return {
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": encoder.kv_heads,
        "num_layers": encoder.layers,
        "encoder_hidden_size": token_dim,
        "prefix_projection": False,
        "init_weights": None,
    }


def from_hf_config(hf: dict[str, Any]) -> PrefixTuningConfig:
    """HF PEFT saves the projected table even with prefix_projection: it loads as a table."""
    refuse_encoder_decoder(hf)
    return PrefixTuningConfig(
        num_virtual_tokens=hf.get("num_virtual_tokens"),
        modules_to_save=hf.get("modules_to_save") or (),
    )


def export_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved state: the MLP folded into the table it computes."""
    kept = {k: v for k, v in state.items() if not k.startswith(ENCODER + ".")}
    with torch.no_grad():
        return {**kept, EMBEDDING_KEY: prefix_encoder(model).table()}


def disk_key(key: str) -> str:
    return HF_KEY if key == EMBEDDING_KEY else "base_model." + key


METHOD = Method(
    peft_type="PREFIX_TUNING",
    prefix="prefix_",
    config_cls=PrefixTuningConfig,
    layer_types=(PrefixEncoder,),
    inject=inject_prefix_tuning,
    to_hf_config=to_hf_config,
    from_hf_config=from_hf_config,
    disk_key=disk_key,
    export_state=export_state,
)
