"""Which modules a method adapts: per-architecture defaults and the target resolver.

A target spec is one of
  None          the architecture's default (`DEFAULT_TARGETS[model.config.model_type]`)
  "all-linear"  every Linear / Conv1D except the output head (lm_head, classifier, score)
  other str     a regex, `re.fullmatch`-ed against the full module path
  tuple         module-name suffixes: a path matches "q_proj" if it is "q_proj" or
                ends in ".q_proj" (the rule HF PEFT uses for a list of names)

Only Linear-like modules (`nn.Linear`, transformers' `Conv1D`) are ever returned.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_core.configs import ALL_LINEAR, TargetSpec

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bert": ("query", "value"),
}

# (IA)³'s defaults, as HF PEFT's TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING:
# the modules it rescales, and those of them that are feed-forward (scaled at their input).
# BERT's "output.dense" also matches attention.output.dense, so HF PEFT scales that input too.
IA3_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("k_proj", "v_proj", "down_proj"),
    "gpt2": ("c_attn", "mlp.c_proj"),
    "bert": ("key", "value", "output.dense"),
}
IA3_FEEDFORWARD: dict[str, tuple[str, ...]] = {
    "llama": ("down_proj",),
    "gpt2": ("mlp.c_proj",),
    "bert": ("output.dense",),
}


@dataclass(frozen=True)
class AdapterSites:
    """Where bottleneck adapters sit in a transformer block, as paths relative to the block."""

    blocks: str  # the ModuleList of blocks: a block's path is "<...>.<blocks>.<i>"
    attention_output: str  # attention's output projection: Houlsby's first adapter
    ffn_output: str  # the FFN's last projection: Houlsby's second adapter, Pfeiffer's only
    ffn: str  # the block a parallel adapter sits beside, called as ffn(x), x the FFN's input
    ffn_takes_residual: bool = False  # called as ffn(h_ff, x) instead: LayerNorm(dense(h_ff) + x)


# Bottleneck adapters' sites (bottleneck.py). BERT's sublayer outputs are the dense layers
# before each LayerNorm(· + residual); its BertOutput(h_ff, attention_output) is called with
# the FFN's input as the residual, so a parallel adapter adds to that argument.
ADAPTER_SITES: dict[str, AdapterSites] = {
    "llama": AdapterSites("layers", "self_attn.o_proj", "mlp.down_proj", "mlp"),
    "gpt2": AdapterSites("h", "attn.c_proj", "mlp.c_proj", "mlp"),
    "bert": AdapterSites("layer", "attention.output.dense", "output.dense", "output", True),
}

# Prefix tuning's sites (prefix_tuning.py): each block's self-attention, the module that
# calls `cache.update(keys, values, layer_idx)`, as (blocks ModuleList, path inside a block).
SELF_ATTENTION: dict[str, tuple[str, str]] = {
    "llama": ("layers", "self_attn"),
    "gpt2": ("h", "attn"),
    "bert": ("layer", "attention.self"),
}

# The sequence-classification head of each architecture's *ForSequenceClassification.
CLASSIFIER_HEADS: dict[str, str] = {"llama": "score", "gpt2": "score", "bert": "classifier"}

OUTPUT_HEADS = ("lm_head", "classifier", "score")

LINEAR_TYPES = (nn.Linear, Conv1D)


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _wrapped(module: nn.Module) -> nn.Module | None:
    """The module an adapter layer (`base_layer`) or modules_to_save wrapper holds, else None."""
    for name in ("base_layer", "original_module"):
        inner = getattr(module, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return None


def linear_paths(model: nn.Module) -> list[str]:
    """Paths of every Linear-like module, in module order.

    A wrapper counts as the module it wraps and its insides are skipped, so an
    adapted model lists the same paths as its base model.
    """
    paths, wrappers = [], []
    for path, module in model.named_modules():
        if any(path.startswith(w + ".") for w in wrappers):
            continue
        inner = _wrapped(module)
        if inner is not None:
            wrappers.append(path)
        if isinstance(module if inner is None else inner, LINEAR_TYPES):
            paths.append(path)
    return paths


def leaf_names(paths: Iterable[str]) -> list[str]:
    """Last path component of each path, deduplicated, first-seen order."""
    return list(dict.fromkeys(path.rsplit(".", 1)[-1] for path in paths))


def matches_suffix(path: str, names: Iterable[str]) -> bool:
    return any(path == name or path.endswith("." + name) for name in names)


def default_targets(
    model: nn.Module, defaults: dict[str, tuple[str, ...]] = DEFAULT_TARGETS
) -> tuple[str, ...]:
    kind = model_type(model)
    if kind not in defaults:
        known = ", ".join(defaults)
        raise ValueError(
            f"no default target modules for model type {kind!r} (known: {known}); "
            "set target_modules explicitly, e.g. 'all-linear'"
        )
    return defaults[kind]


def _select(paths: list[str], spec: tuple[str, ...] | str) -> list[str]:
    if spec == ALL_LINEAR:
        return [p for p in paths if not matches_suffix(p, OUTPUT_HEADS)]
    if isinstance(spec, str):
        return [p for p in paths if re.fullmatch(spec, p)]
    return [p for p in paths if matches_suffix(p, spec)]


def resolve_targets(
    model: nn.Module,
    spec: TargetSpec,
    exclude: tuple[str, ...] = (),
    defaults: dict[str, tuple[str, ...]] = DEFAULT_TARGETS,
) -> list[str]:
    """Module paths that `spec` selects; modules named in `exclude` (suffixes) are left out.

    `spec` None means the architecture's entry in `defaults` (a method's own table).

    Raises ValueError listing the model's Linear-like module names when nothing matches.
    """
    spec = default_targets(model, defaults) if spec is None else spec
    candidates = [p for p in linear_paths(model) if not matches_suffix(p, exclude)]
    selected = _select(candidates, spec)
    if not selected:
        names = ", ".join(leaf_names(linear_paths(model)))
        raise ValueError(
            f"target_modules {spec!r} matched no Linear/Conv1D module of this model; "
            f"its Linear-like module names are: {names}"
        )
    return selected


def resolve_modules_to_save(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Module paths of the modules named (as suffixes) in `names`; outermost match only."""
    found = [path for path, _ in model.named_modules() if path and matches_suffix(path, names)]
    return [p for p in found if not any(p.startswith(q + ".") for q in found)]


def classifier_head(model: nn.Module) -> str | None:
    """The classification head name of a *ForSequenceClassification model, else None."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return None
    kind = model_type(model)
    if kind in CLASSIFIER_HEADS:
        return CLASSIFIER_HEADS[kind]
    present = [name for name in ("score", "classifier") if hasattr(model, name)]
    return present[0] if present else None


def compact_target_names(model: nn.Module, paths: list[str]) -> list[str]:
    """The shortest list-of-names spec that selects exactly `paths` under suffix matching.

    Leaf names when they select no extra Linear-like module, else the full paths
    (which HF PEFT matches exactly too).
    """
    names = leaf_names(paths)
    if set(_select(linear_paths(model), tuple(names))) == set(paths):
        return sorted(names)
    return sorted(paths)
