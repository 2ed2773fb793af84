"""One small forward, recorded: which Linear-like layer feeds which tensor, who reads the cache.

structure.py finds a transformer block's places (queries, keys, values, the attention output
projection, the FFN) from what the model computes, not from what its modules are called.
This module runs the model's body (`model.base_model`) once on T = 4 token ids (batch 1,
eval mode, no grad, the RNG left as it was) and records:

    provenance   every tensor made during the forward is tagged with the set of Linear-like
                 layers nearest upstream of it: a layer's output is tagged {that layer}, any
                 other op's output the union of its inputs' tags (a TorchFunctionMode sees
                 every op, views and in-place ops included). So the keys a self-attention
                 hands to its cache are tagged {k_proj} (RoPE adds no layer), a fused
                 projection's slices {query_key_value}, o_proj's input {q_proj, k_proj, v_proj}.
    linear calls the layer, the tags of its input, the input tensor's identity, call order.
    cache.update the model gets a DynamicCache whose update(keys, values, layer_idx) notes the
                 innermost module running (the self-attention), the tags of keys and values,
                 their shape (b, n_kv, t, d_h) and the keyword the module got the cache by.
    module calls each module's first call: which tensors it got (by identity, per argument)
                 and the tags of its output.

On the meta device nothing is computed (shapes only): a model built with
`torch.device("meta")` traces without memory (a 30-layer one in about 0.4 s on a CPU); a
real model runs 4 tokens. Every tensor recorded is kept alive until the trace ends, so
identities compared within one trace are never reused.
"""

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from transformers.cache_utils import DynamicCache

TOKENS = 4
Tags = frozenset[str]
NO_TAGS: Tags = frozenset()


@dataclass(frozen=True)
class LinearCall:
    path: str
    input_tags: Tags  # the Linear-like layers nearest upstream of its input
    input_id: int  # identity of its input tensor (valid within one trace)


@dataclass(frozen=True)
class UpdateCall:
    module: str  # innermost module running when cache.update was called
    layer_idx: int
    key_tags: Tags
    value_tags: Tags
    shape: tuple[int, ...]  # keys' shape (b, n_kv, t, d_h)
    cache_arg: str | None  # the keyword `module` received the cache by; None: not a keyword


@dataclass
class Trace:
    linears: list[LinearCall] = field(default_factory=list)  # in call order
    updates: list[UpdateCall] = field(default_factory=list)
    arguments: dict[str, dict[str | int, int]] = field(default_factory=dict)  # first call: ids
    output_tags: dict[str, Tags] = field(default_factory=dict)  # first call's first output


def _inside(path: str, roots: set[str]) -> bool:
    """`path` lies strictly inside one of `roots`."""
    parts = path.split(".")
    return any(".".join(parts[:i]) in roots for i in range(1, len(parts)))


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


class _Provenance(TorchFunctionMode):
    """Tags every op's output with the union of its inputs' tags."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[int, Tags] = {}
        self.alive: list[torch.Tensor] = []  # keeps tagged tensors alive: their ids stay theirs

    def tags_of(self, tensors: Any) -> Tags:
        return NO_TAGS.union(*(self.tags.get(id(t), NO_TAGS) for t in _tensors(tensors)))

    def tag(self, tensors: Any, tags: Tags, replace: bool = False) -> None:
        for tensor in _tensors(tensors):
            old = NO_TAGS if replace else self.tags.get(id(tensor), NO_TAGS)
            self.tags[id(tensor)] = old | tags
            self.alive.append(tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tags = self.tags_of((args, kwargs))
        if tags:
            self.tag(out, tags)
        return out


class _RecordingCache(DynamicCache):
    """A DynamicCache that tells the recorder about every update."""

    recorder: "_Recorder"

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.recorder.note_update(keys, values, layer_idx)
        return super().update(keys, values, layer_idx, *args, **kwargs)


class _Recorder:
    """Module hooks: the stack of running modules, linear calls, first calls' arguments."""

    def __init__(self, model: nn.Module, linears: set[str]):
        self.trace = Trace()
        self.provenance = _Provenance()
        self.stack: list[str] = []
        self.cache_keys: dict[str, str | None] = {}
        self.cache: _RecordingCache | None = None
        self.linears = linears
        self.handles = []
        for path, module in model.named_modules():
            if _inside(path, linears):
                continue  # inside an adapter wrapper: the wrapper is the layer
            self.handles.append(
                module.register_forward_pre_hook(self._enter(path), with_kwargs=True)
            )
            self.handles.append(module.register_forward_hook(self._leave(path), always_call=True))

    def _enter(self, path: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.stack.append(path)
            if path in self.trace.arguments:
                return
            given = {**dict(enumerate(args)), **kwargs}
            tensors = {k: v for k, v in given.items() if isinstance(v, torch.Tensor)}
            self.provenance.alive.extend(tensors.values())
            self.trace.arguments[path] = {key: id(value) for key, value in tensors.items()}
            names = [key for key, value in kwargs.items() if value is self.cache]
            self.cache_keys[path] = names[0] if names else None

        return hook

    def _leave(self, path: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.stack.pop()
            if path in self.linears:
                self._note_linear(path, args, output)
            elif path not in self.trace.output_tags:
                first = _tensors(output)[:1]
                self.trace.output_tags[path] = self.provenance.tags_of(first)

        return hook

    def _note_linear(self, path: str, args: tuple, output: Any) -> None:
        x = args[0] if args else None
        self.provenance.alive.append(x)
        call = LinearCall(path, self.provenance.tags_of(x), id(x))
        self.trace.linears.append(call)
        self.provenance.tag(output, frozenset({path}), replace=True)

    def note_update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int) -> None:
        module = self.stack[-1] if self.stack else ""
        tags = self.provenance.tags_of
        call = UpdateCall(
            module,
            layer_idx,
            tags(keys),
            tags(values),
            tuple(keys.shape),
            self.cache_keys.get(module),
        )
        self.trace.updates.append(call)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _recording_cache(model: nn.Module, recorder: _Recorder) -> _RecordingCache:
    try:
        cache = _RecordingCache(config=model.config)
    except Exception:  # a config DynamicCache cannot read (or none): a plain one
        cache = _RecordingCache()
    cache.recorder = recorder
    return cache


def _call_kwargs(model: nn.Module, ids: torch.Tensor, cache: DynamicCache) -> dict[str, Any]:
    """The forward's arguments, under the names it takes: the token ids and an all-ones mask,
    or on the meta device their embeddings alone (padding checks there call .item()), and
    the cache."""
    parameters = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"input_ids": ids}
    if ids.is_meta and "inputs_embeds" in parameters:
        kwargs = {"inputs_embeds": model.get_input_embeddings()(ids)}
    elif "attention_mask" in parameters:
        kwargs["attention_mask"] = torch.ones_like(ids)
    cache_name = next((n for n in ("cache", "past_key_values") if n in parameters), None)
    if cache_name is not None:
        kwargs[cache_name] = cache
        if "use_cache" in parameters:
            kwargs["use_cache"] = True
    return kwargs


def _token_ids(model: nn.Module) -> torch.Tensor:
    embeddings = model.get_input_embeddings()
    vocab, device = embeddings.weight.shape[0], embeddings.weight.device
    return (torch.arange(TOKENS, device=device) % max(vocab - 3, 1) + min(3, vocab - 1))[None]


@torch.no_grad()
def trace_forward(model: nn.Module, linears: list[str]) -> Trace:
    """Run the model once on a few token ids and return what it did (module docstring).

    `linears`: the paths of its Linear-like layers (adapter wrappers count as the layer).
    """
    modes = {module: module.training for module in model.modules()}
    recorder = _Recorder(model, set(linears))
    recorder.cache = _recording_cache(model, recorder)
    body = getattr(model, "base_model", model)  # a head's forward may not take the cache
    kwargs = _call_kwargs(body, _token_ids(model), recorder.cache)
    try:
        model.eval()
        with torch.random.fork_rng(devices=[]), recorder.provenance:
            body(**kwargs)
    finally:
        recorder.remove()
        for module, training in modes.items():
            module.training = training
    return recorder.trace
