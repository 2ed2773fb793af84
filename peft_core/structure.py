"""Where the methods act in a transformer: found from the module graph and one traced forward.

Every decoder and encoder transformers ships is a stack of L blocks, each

    h' = h  + O(Attn(Q(x), K(x), V(x)))          x = the attention's input (often norm(h))
    h'' = h' + W_out(f(W_in(y)))                  y = the FFN's input (often norm(h'))

with Q, K, V, O, W_in, W_out Linear-like layers (nn.Linear or transformers' Conv1D; fused
variants compute Q|K|V or gate|up in one layer). The methods need, per block:

    LoRA / DoRA   Q and V (a fused QKV layer once)         HF PEFT's defaults
    (IA)³         K, V and W_out (W_out scaled at its input, "feedforward")
    bottleneck    O's and W_out's outputs (Houlsby, Pfeiffer); beside the FFN, from y (parallel)
    prefix        the self-attention module that calls cache.update(keys, values, layer_idx)
                  with keys and values shaped (b, n_kv, t, d_h)

None of this is read from a table of names. The blocks are the one nn.ModuleList whose length
is config.num_hidden_layers (and which holds Linear-like layers). The rest comes from a
forward on 4 tokens (trace.py; on the meta device nothing is computed): the module running
when cache.update is called is the self-attention, the layers upstream of the keys and values
it caches are K and V, and the shape of the keys gives n_kv and d_h (Falcon's multi-query
layout caches 1 key head, its new decoder architecture caches every head: whatever the
model caches, a prefix must match). O is the one layer reading the attention's result (its
input is downstream of V); Q is what else feeds O's input (nothing else: a fused QKV).
W_out is the one layer after O whose output reaches the block's output; the W_in are the
layers after O reading no other FFN layer, and y is their input. The FFN module is the
deepest module that contains W_out and is called with y: ffn(y) (Llama's mlp), or ffn(h, y)
whose residual argument is y (BERT's output: LayerNorm(dense(h) + y)); without one (OPT keeps
fc1 and fc2 in the block itself) a parallel adapter reads y at W_in and adds at W_out.

A self-attention that never calls cache.update (DeBERTa-v2's disentangled attention keeps
no cache) has no place for a prefix; its Q, K, V are then taken by their names (QKV_NAMES).
Blocks must agree with block 0; two candidates for one place raise ValueError naming them.
"""

import weakref
from dataclasses import dataclass
from typing import Any

from torch import nn

from peft_core.graph import common_parent, find_blocks, in_out, linear_layers
from peft_core.target_match import is_under
from peft_core.trace import LinearCall, Trace, trace_forward

# Only where no cache.update tells keys from values (an attention without a KV cache).
QKV_NAMES = {
    "query": ("q_proj", "query", "query_proj", "q", "wq", "q_lin", "to_q"),
    "key": ("k_proj", "key", "key_proj", "k", "wk", "k_lin", "to_k"),
    "value": ("v_proj", "value", "value_proj", "v", "wv", "v_lin", "to_v"),
    "fused": ("qkv_proj", "query_key_value", "c_attn", "qkv", "wqkv", "Wqkv", "in_proj"),
}


@dataclass(frozen=True)
class KVCache:
    """How the self-attention reads its KV cache: what prefix tuning hooks into."""

    cache_arg: str  # the keyword the attention module takes its cache by ("cache", "layer_past")
    kv_heads: int  # n_kv of the keys/values it caches, (b, n_kv, t, d_h)
    head_dim: int  # d_h
    layer_indices: tuple[int, ...]  # the layer_idx each block passes to cache.update


@dataclass(frozen=True)
class Places:
    """A transformer's places; block-relative paths unless said otherwise."""

    blocks: str  # path of the ModuleList of blocks: block i is "<blocks>.<i>"
    layers: int
    hidden: int  # d, the width of the residual stream
    attention: str  # the self-attention module
    query: tuple[str, ...]
    key: tuple[str, ...]
    value: tuple[str, ...]
    attention_output: str  # O
    ffn_inputs: tuple[str, ...]  # W_in (gate, up; fc1; intermediate.dense), reading y
    ffn_output: str | None  # W_out; None: blocks without an FFN
    ffn: str | None  # module called as ffn(y) or ffn(h, y); None: no such module
    ffn_takes_residual: bool  # called as ffn(h, y): y is its residual argument
    kv: KVCache | None  # None: no cache.update, so no prefix (no_kv says why)
    no_kv: str = ""

    def in_blocks(self, relative: str) -> list[str]:
        """The full path of `relative` in every block, in layer order."""
        return [f"{self.blocks}.{i}.{relative}" for i in range(self.layers)]


# ---------------------------------------------------------------- places, from a trace


class _Block:
    """One block's slice of the trace, paths relative to the block."""

    def __init__(self, trace: Trace, block: str):
        prefix = block + "."
        self.prefix = prefix
        self.calls = [c for c in trace.linears if c.path.startswith(prefix)]
        self.linears = list(dict.fromkeys(self.rel(c.path) for c in self.calls))
        self.updates = [u for u in trace.updates if u.module.startswith(prefix)]
        self.arguments = {
            self.rel(p): a for p, a in trace.arguments.items() if p.startswith(prefix)
        }
        self.output_tags = self.own(trace.output_tags.get(block, frozenset()))

    def rel(self, path: str) -> str:
        return path[len(self.prefix) :]

    def own(self, tags: frozenset[str]) -> set[str]:
        """The block's own layers among `tags`, relative."""
        return {self.rel(t) for t in tags if t.startswith(self.prefix)}

    def input_tags(self, relative: str) -> set[str]:
        return set().union(
            *(self.own(c.input_tags) for c in self.calls if self.rel(c.path) == relative)
        )

    def first_call(self, relative: str) -> LinearCall:
        return next(c for c in self.calls if self.rel(c.path) == relative)


def _one(candidates: list[str] | set[str], what: str, block: str) -> str:
    candidates = sorted(candidates)
    if len(candidates) != 1:
        found = ", ".join(f"{block}.{c}" for c in candidates) or "none"
        raise ValueError(f"cannot tell {what} in {block}: candidates {found}")
    return candidates[0]


def _by_name(block: _Block) -> tuple[str, str, str]:
    """(query, key, value) layers by their names: the fallback without cache.update."""

    def named(role: str) -> list[str]:
        return [p for p in block.linears if p.rsplit(".", 1)[-1] in QKV_NAMES[role]]

    fused = named("fused")
    if len(fused) == 1 and not any(named(role) for role in ("query", "key", "value")):
        return fused[0], fused[0], fused[0]
    where = block.prefix[:-1]
    roles = ("query", "key", "value")
    query, key, value = (_one(named(role), f"the {role} projection", where) for role in roles)
    return query, key, value


def _attention(block: _Block) -> tuple[str, set[str], set[str], Any]:
    """(attention module, K, V, the update call or None)."""
    where = block.prefix[:-1]
    modules = {u.module for u in block.updates}
    if modules:
        update = block.updates[0]
        _one(
            {block.rel(m) for m in modules},
            "the self-attention (modules calling cache.update)",
            where,
        )
        keys, values = block.own(update.key_tags), block.own(update.value_tags)
        if not keys or not values:
            raise ValueError(
                f"the keys/values {update.module} caches come from no layer of {where}"
            )
        return block.rel(update.module), keys, values, update
    query, key, value = _by_name(block)
    return common_parent((query, key, value)), {key}, {value}, None


def _ffn(block: _Block, attention_layers: set[str], after: int) -> tuple:
    """(W_in, W_out, ffn module, takes residual), or ((), None, None, False) without an FFN."""
    where = block.prefix[:-1]
    later = [block.rel(c.path) for c in block.calls[after:]]
    ffn = [p for p in dict.fromkeys(later) if p not in attention_layers]
    outputs = block.output_tags & set(ffn)
    if not outputs:
        return (), None, None, False
    output = _one(outputs, "the FFN's output projection", where)
    inputs = tuple(p for p in ffn if not block.input_tags(p) & set(ffn))
    ids = {block.first_call(p).input_id for p in inputs}
    y = next(iter(ids)) if len(ids) == 1 else None
    found = [
        (module, key)
        for module, arguments in block.arguments.items()
        if is_under(output, module)
        and module not in block.linears
        and not any(is_under(a, module) for a in attention_layers)
        for key, tensor in arguments.items()
        if tensor == y and key in (0, "hidden_states", 1)
    ]
    if not found:
        return inputs, output, None, False
    module, key = max(found, key=lambda item: len(item[0]))
    return inputs, output, module, key == 1  # ffn(h, y): y is the residual argument


def _kv_cache(update: Any, block: _Block) -> tuple[KVCache | None, str]:
    where = block.prefix[:-1]
    if update is None:
        return None, (
            f"the self-attention of {where} never calls cache.update(keys, values, layer_idx): "
            "there is no place to put prefix keys/values"
        )
    if len(update.shape) != 4 or update.cache_arg is None:
        return None, (
            f"{update.module} caches keys shaped {update.shape}, not (batch, kv_heads, tokens, "
            "head_dim), or takes its cache positionally: prefix tuning cannot hook it"
        )
    return KVCache(update.cache_arg, update.shape[1], update.shape[3], (update.layer_idx,)), ""


def block_places(trace: Trace, block: str, linears: dict[str, nn.Module]) -> dict[str, Any]:
    """Block `block`'s places from the trace (the module docstring's derivation)."""
    view = _Block(trace, block)
    attention, keys, values, update = _attention(view)
    readers = [p for p in view.linears if view.input_tags(p) & values and p not in values]
    output = _one(readers, "the attention's output projection (layers reading it)", block)
    query = (view.input_tags(output) - keys - values) or (keys & values)
    after = view.calls.index(view.first_call(output)) + 1
    attention_layers = {*query, *keys, *values, output}
    ffn_inputs, ffn_output, ffn, residual = _ffn(view, attention_layers, after)
    kv, no_kv = _kv_cache(update, view)
    return {
        "hidden": in_out(linears[f"{block}.{output}"])[1],
        "attention": attention,
        "query": tuple(sorted(query)),
        "key": tuple(sorted(keys)),
        "value": tuple(sorted(values)),
        "attention_output": output,
        "ffn_inputs": ffn_inputs,
        "ffn_output": ffn_output,
        "ffn": ffn,
        "ffn_takes_residual": residual,
        "kv": kv,
        "no_kv": no_kv,
    }


def _merge_blocks(blocks: str, per_block: list[dict[str, Any]]) -> Places:
    """Block 0's places, after checking every block has the same (the kv layer indices kept)."""
    first = {**per_block[0], "kv": None, "no_kv": ""}
    for i, places in enumerate(per_block[1:], start=1):
        differing = [k for k, v in {**places, "kv": None, "no_kv": ""}.items() if v != first[k]]
        if differing:
            raise ValueError(
                f"block {blocks}.{i} differs from {blocks}.0 in {', '.join(differing)}"
            )
    kvs = [p["kv"] for p in per_block]
    kv = None
    if all(kvs) and len({(k.cache_arg, k.kv_heads, k.head_dim) for k in kvs}) == 1:
        indices = tuple(k.layer_indices[0] for k in kvs)
        kv = KVCache(kvs[0].cache_arg, kvs[0].kv_heads, kvs[0].head_dim, indices)
    no_kv = per_block[0]["no_kv"] or ("" if kv else "the blocks cache keys/values differently")
    return Places(blocks=blocks, layers=len(per_block), **{**first, "kv": kv, "no_kv": no_kv})


# Per model object: its places, or the ValueError finding them raised (raised again).
_FOUND: "weakref.WeakKeyDictionary[nn.Module, Places | ValueError]" = weakref.WeakKeyDictionary()


def find_places(model: nn.Module) -> Places:
    """The model's places (module docstring), traced once per model object."""
    if model not in _FOUND:
        try:
            _FOUND[model] = _derive_places(model)
        except ValueError as err:
            _FOUND[model] = err
    found = _FOUND[model]
    if isinstance(found, ValueError):
        raise ValueError(*found.args)
    return found


def _derive_places(model: nn.Module) -> Places:
    blocks, count = find_blocks(model)
    linears = linear_layers(model)
    try:
        trace = trace_forward(model, list(linears))
    except Exception as err:
        raise ValueError(
            f"cannot trace a forward of this {type(model).__name__} to find its attention and "
            f"FFN ({type(err).__name__}: {err}); name the modules explicitly"
        ) from err
    per_block = [block_places(trace, f"{blocks}.{i}", linears) for i in range(count)]
    return _merge_blocks(blocks, per_block)


def share_places(source: nn.Module, copy: nn.Module) -> None:
    """`copy` (a deep copy of `source`) has `source`'s places (or refusal): no second trace."""
    if source not in _FOUND:
        try:
            find_places(source)
        except ValueError:
            pass
    _FOUND[copy] = _FOUND[source]
