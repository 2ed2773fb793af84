"""What each method would adapt on a model, as JSON: for the web, from a meta-device model.

    describe(model) -> {
      "model_type": "qwen2",
      "linears": [{"path": "model.layers.0.self_attn.q_proj", "in": 896, "out": 896,
                   "head": false}, ...],        every Linear-like module; head: an output head
                                                 (left out by "all-linear")
      "classification_head": None,              "score" / "classifier": trained in full
      "blocks": "model.layers", "layers": 24,   the ModuleList of blocks (None if unclear)
      "places": {"attention": "self_attn", "query": [...], "key": [...], "value": [...],
                 "attention_output": ..., "ffn_inputs": [...], "ffn_output": ..., "ffn": ...,
                 "kv_heads": 2, "head_dim": 64, "prefix_refused": ""}   block-relative
                or {"refused": "why the places could not be found"},
      "methods": {"lora": {"modules": [...], "count": 48, "trainable": 540672}, ...,
                  "prefix": {"refused": "why"}},  one entry per METHOD_LIST key
    }

Each method's entry is what `peft_core.apply` does with the method's default config
(configs.py) to a deep copy of the model: the paths its `inject` adapted and the exact
trainable parameter count, without a classification head trained beside it. On the meta
device (`with torch.device("meta"): AutoModelFor….from_config(config)`) that costs no
memory and runs nothing that needs values: the structure's trace computes shapes only, and
prefix tuning skips its init from real tokens. A refused method says why (its ValueError).
Preview another target spec with target_match.preview_targets(described, spec), torch-free.
"""

import copy
from typing import Any

from torch import nn

from peft_core.graph import classifier_head, find_blocks, linear_rows
from peft_core.methods import METHOD_LIST, MethodEntry
from peft_core.model import adapt
from peft_core.structure import Places, find_places, share_places
from peft_core.targets import model_type


def describe(model: nn.Module) -> dict[str, Any]:
    """The model's Linear-like modules, blocks, places and each method's default footprint."""
    try:
        blocks, layers = find_blocks(model)
    except ValueError:
        blocks, layers = None, None
    return {
        "model_type": model_type(model),
        "linears": linear_rows(model),
        "classification_head": classifier_head(model),
        "blocks": blocks,
        "layers": layers,
        "places": _places(model),
        "methods": {entry.key: footprint(model, entry) for entry in METHOD_LIST},
    }


def _places(model: nn.Module) -> dict[str, Any]:
    try:
        places: Places = find_places(model)
    except ValueError as err:
        return {"refused": str(err)}
    kv = places.kv
    return {
        "attention": places.attention,
        "query": list(places.query),
        "key": list(places.key),
        "value": list(places.value),
        "attention_output": places.attention_output,
        "ffn_inputs": list(places.ffn_inputs),
        "ffn_output": places.ffn_output,
        "ffn": places.ffn,
        "kv_heads": kv.kv_heads if kv else None,
        "head_dim": kv.head_dim if kv else None,
        "prefix_refused": places.no_kv,
    }


def footprint(model: nn.Module, entry: MethodEntry) -> dict[str, Any]:
    """{"modules", "count", "trainable"} of the method's default config, or {"refused"}."""
    trial = copy.deepcopy(model)
    share_places(model, trial)
    try:
        paths = adapt(trial, entry.config_cls())
    except ValueError as err:
        return {"refused": str(err)}
    trainable = sum(
        p.numel() for name, p in trial.named_parameters() if p.requires_grad and not _head(name)
    )
    return {"modules": paths, "count": len(paths), "trainable": trainable}


def _head(name: str) -> bool:
    """A parameter of a modules_to_save copy (the classification head apply adds)."""
    return ".trained_module." in name or name.startswith("trained_module.")
