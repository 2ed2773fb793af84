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

As in HF PEFT, where P is a p-token past, real tokens take positions p.. (embeddings that
number positions from the ids, RoBERTa's, count p more tokens past) and the prefix is
visible to every query (in sliding-window layers too); prefix keys are not rotated (RoPE).
Sequence classification pools a real token (BERT: the first one). Causal LMs get logits
for the real tokens only.

Mechanism: a forward pre-hook on each self-attention (structure.py finds it: the module
that calls cache.update(keys, values, layer_idx), with the keyword it takes the cache by,
"cache" or Falcon's and GPT-NeoX's "layer_past") hands it a stand-in for its KV cache whose
update() returns [P^l ; keys], and gives its attention mask p visible columns in front; a
pre-hook on the body shifts positions by p. n_kv and d_h are those of the keys the
attention caches, (b, n_kv, t, d_h), as traced: grouped-query n_kv, Falcon's multi-query 1
and its new decoder architecture every head (it caches keys broadcast to all heads).
Refused: an attention that never calls cache.update (DeBERTa-v2: its disentangled
attention keeps no cache, and its relative-position terms have no place for keys without
positions), and ALiBi (Falcon alibi=True, Bloom: biases built for the real keys only). A real KV cache
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

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import EncoderDecoderCache

from peft_core.configs import PrefixTuningConfig
from peft_core.graph import find_body
from peft_core.methods import Method
from peft_core.prompt_tuning import body_kwargs, refuse_encoder_decoder
from peft_core.structure import KVCache, Places, find_places

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
        """Body pre-hook: real tokens numbered as after a p-token past."""
        if self.disabled:
            return None
        kwargs = body_kwargs(args, kwargs)
        p = self.embedding.shape[0]
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + p
        else:
            kwargs["position_ids"] = _default_positions(body, kwargs, p)
        return (), kwargs


def _default_positions(body: nn.Module, kwargs: dict[str, Any], p: int) -> torch.Tensor | None:
    """What the body would use after a p-token past: past + p + 0..n-1, (1, n); embeddings
    that number positions from the ids (RoBERTa: padding_idx + 1 + running count of real
    tokens) by their own rule, or as they do from embeddings (None: they number them)."""
    tokens = kwargs.get("input_ids")
    cache = kwargs.get("cache")
    past = cache.get_seq_length() if cache is not None else 0
    embeddings = getattr(body, "embeddings", None)
    numbering = getattr(embeddings, "create_position_ids_from_input_ids", None)
    if numbering is not None:
        return None if tokens is None else numbering(tokens, embeddings.padding_idx, past + p)
    if tokens is None:
        tokens = kwargs["inputs_embeds"]
    start = past + p
    return torch.arange(start, start + tokens.shape[1], device=tokens.device).unsqueeze(0)


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
    mask: torch.Tensor | None,
    causal: bool,
    implementation: str,
    p: int,
    hidden: torch.Tensor,
    past: int,
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
    queries = hidden.shape[1]
    if not causal or queries == 1 or "flash" in implementation:
        return None
    ones = {"dtype": torch.bool, "device": hidden.device}
    causal_mask = torch.ones(queries, past + queries, **ones).tril(diagonal=past)
    allowed = torch.cat([torch.ones(queries, p, **ones), causal_mask], dim=1)[
        None, None
    ]  # (1,1,t,p+k)
    if implementation == "sdpa":
        return allowed
    additive = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
    return additive.masked_fill(~allowed, torch.finfo(hidden.dtype).min)


class AttentionPrefix:
    """Forward pre-hook of block `layer`'s self-attention: the prefix through its cache and mask.

    `kv` says how the attention takes its cache (keyword) and which layer_idx it passes.
    """

    def __init__(self, encoder: PrefixEncoder, layer: int, kv: KVCache, implementation: str):
        self.encoder, self.layer = encoder, layer
        self.cache_arg, self.layer_idx = kv.cache_arg, kv.layer_indices[layer]
        self.implementation = implementation

    def __call__(self, attention: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if self.encoder.disabled:
            return None
        kwargs = dict(kwargs)
        if self.cache_arg == "cache" and "past_key_values" in kwargs:  # transformers 5's old name
            kwargs["cache"] = kwargs.pop("past_key_values")
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get(self.cache_arg)
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        p = self.encoder.embedding.shape[0]
        mask = kwargs.get("attention_mask")
        causal = getattr(attention, "is_causal", True)  # transformers' SDPA default
        kwargs["attention_mask"] = prefixed_mask(mask, causal, self.implementation, p, hidden, past)
        kwargs[self.cache_arg] = PrefixedCache(cache, *self.encoder.layer_prefix(self.layer))
        return args, kwargs


# ---------------------------------------------------------------- inject


def prefix_places(model: nn.Module) -> Places:
    """The model's places, refused where a prefix has no place (module docstring)."""
    places = find_places(model)
    if places.kv is None:
        raise ValueError(f"prefix tuning cannot adapt this {type(model).__name__}: {places.no_kv}")
    config = model.config
    if getattr(config, "alibi", False) is True or getattr(config, "model_type", "") == "bloom":
        raise ValueError(
            "prefix tuning cannot adapt an ALiBi model: its attention biases are built for the "
            "real keys only, and prefix keys would get no distance bias"
        )
    return places


def self_attention_paths(model: nn.Module) -> list[str]:
    """Each block's self-attention module, in layer order."""
    places = prefix_places(model)
    return places.in_blocks(places.attention)


def kv_geometry(model: nn.Module) -> tuple[int, int]:
    """(n_kv, d_h) of the keys and values the model's self-attention caches."""
    kv = prefix_places(model).kv
    return kv.kv_heads, kv.head_dim


def inject_prefix_tuning(model: nn.Module, config: PrefixTuningConfig) -> list[str]:
    """Attach `model.prefix_encoder` and hook it into every self-attention; returns their paths.

    Composable: it adds one module and hooks, and leaves every path of the model as it was
    (MAM adds a parallel adapter beside it).
    """
    if hasattr(model, ENCODER):
        raise ValueError("this model already has a prefix")
    places = prefix_places(model)
    paths = places.in_blocks(places.attention)
    weight = model.get_input_embeddings().weight
    dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
    kv = places.kv
    sizes = (config.num_virtual_tokens, len(paths), kv.kv_heads, kv.head_dim, weight.shape[1])
    encoder = PrefixEncoder(*sizes, config.projection_dim).to(device=weight.device, dtype=dtype)
    model.add_module(ENCODER, encoder)
    find_body(model).register_forward_pre_hook(encoder.shift_positions, with_kwargs=True)
    implementation = model.config._attn_implementation or "eager"
    for layer, path in enumerate(paths):
        hook = AttentionPrefix(encoder, layer, kv, implementation)
        model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True)
    if encoder.transform is None and not weight.is_meta:  # meta: no values to read
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
    if any(layer.keys.shape[2] != p for layer in cache.layers):
        return  # a layer kept fewer than p tokens (a sliding window shorter than p)
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
