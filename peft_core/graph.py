"""The static module graph: Linear-like layers, the blocks, the heads, the body.

No forward runs here (structure.py traces one for the places inside a block):

    linear layers   nn.Linear and transformers' Conv1D (weight (d_in, d_out)); an adapter
                    layer counts as the layer it wraps (`base_layer`), so an adapted model
                    lists its base model's paths
    blocks          the one nn.ModuleList of config.num_hidden_layers modules holding
                    Linear-like layers (without a layer count: of same-typed modules)
    heads           the LM head (get_output_embeddings) and, for *ForSequenceClassification,
                    the top-level module (not the body) holding the Linear that outputs
                    num_labels (Llama's score, BERT's classifier, RoBERTa's classifier module)
    body            the deepest module holding both the input embeddings and the blocks: what
                    the heads call (OPT's decoder, past OPTModel)
"""

from itertools import takewhile
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_core.target_match import OUTPUT_HEADS, is_under, select_paths

LINEAR_TYPES = (nn.Linear, Conv1D)


def wrapped(module: nn.Module) -> nn.Module | None:
    """The module an adapter layer (`base_layer`) or modules_to_save wrapper holds, else None."""
    for name in ("base_layer", "original_module"):
        inner = getattr(module, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return None


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear-like layer by path, in module order; a wrapper counts as what it wraps
    and its insides are skipped, so an adapted model lists the paths of its base model."""
    layers, wrappers = {}, []
    for path, module in model.named_modules():
        if any(is_under(path, w) for w in wrappers):
            continue
        inner = wrapped(module)
        if inner is not None:
            wrappers.append(path)
        if isinstance(module if inner is None else inner, LINEAR_TYPES):
            layers[path] = module if inner is None else inner
    return layers


def linear_paths(model: nn.Module) -> list[str]:
    return list(linear_layers(model))


def in_out(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out); Conv1D stores its weight as (d_in, d_out)."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def linear_rows(model: nn.Module) -> list[dict[str, Any]]:
    """{"path", "in", "out", "head"} per Linear-like layer; head: left out by "all-linear"."""
    layers = linear_layers(model)
    body = set(select_paths(list(layers), "all-linear", heads=output_heads(model)))
    return [
        {"path": path, "in": d_in, "out": d_out, "head": path not in body}
        for path, (d_in, d_out) in ((p, in_out(m)) for p, m in layers.items())
    ]


def layer_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "num_hidden_layers", None)


def find_blocks(model: nn.Module) -> tuple[str, int]:
    """(path, L) of the ModuleList of blocks: length num_hidden_layers, holding Linear-likes.

    Without a layer count, the one ModuleList of same-typed modules that holds Linear-likes.
    """
    count, linears = layer_count(model), linear_paths(model)
    candidates = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not any(is_under(p, path) for p in linears):
            continue
        same_type = len({type(block) for block in module}) == 1
        if (len(module) == count) if count is not None else same_type:
            candidates.append(path)
    if len(candidates) != 1:
        found = ", ".join(candidates) or "none"
        raise ValueError(
            f"cannot tell this model's transformer blocks: expected one ModuleList of "
            f"{count or 'same-typed'} blocks holding Linear layers, found {found}"
        )
    return candidates[0], len(model.get_submodule(candidates[0]))


def find_body(model: nn.Module) -> nn.Module:
    """The module that embeds the tokens and runs the blocks: the deepest one holding both.

    Usually `model.base_model`; OPT's heads call `model.decoder` directly, past OPTModel,
    so a hook on base_model would never run. Without blocks found, base_model.
    """
    try:
        blocks, _ = find_blocks(model)
    except ValueError:
        return getattr(model, "base_model", model)
    embeddings = _path_of(model, model.get_input_embeddings()) or ""
    return model.get_submodule(common_parent((blocks + ".x", embeddings)))


def _path_of(model: nn.Module, target: nn.Module) -> str | None:
    return next((path for path, module in model.named_modules() if module is target), None)


def classifier_head(model: nn.Module) -> str | None:
    """The sequence-classification head of a *ForSequenceClassification model, else None:
    the top-level module (not the body) holding the Linear that outputs num_labels."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return None
    labels = getattr(model.config, "num_labels", None)
    body = getattr(model, "base_model", None)
    found = [
        name
        for name, child in model.named_children()
        if child is not body and any(in_out(m)[1] == labels for m in linear_layers(child).values())
    ]
    named = [name for name in found if name in OUTPUT_HEADS]
    if len(found) > 1 and len(named) != 1:
        raise ValueError(f"cannot tell the classification head: candidates {', '.join(found)}")
    if not found:  # no Linear with num_labels outputs: the usual names, if present
        found = [name for name in ("score", "classifier") if hasattr(model, name)]
    return (named or found or [None])[0]


def output_heads(model: nn.Module) -> list[str]:
    """The LM head (get_output_embeddings) and the classification head, where there are."""
    heads = []
    get_output = getattr(model, "get_output_embeddings", None)
    try:
        output = get_output() if callable(get_output) else None
    except (NotImplementedError, AttributeError):
        output = None
    if isinstance(output, nn.Module):
        heads.append(_path_of(model, output))
    heads.append(classifier_head(model))
    return [head for head in heads if head]


def common_parent(paths: tuple[str, ...]) -> str:
    """The deepest module holding every one of `paths` (relative; "" for the block)."""
    parts = [path.split(".")[:-1] for path in paths]
    common = list(takewhile(lambda names: len(set(names)) == 1, zip(*parts, strict=False)))
    return ".".join(names[0] for names in common)
