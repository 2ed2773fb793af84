"""The contract between `model.py` and one PEFT method file.

A method file (`lora.py`, later `dora.py`, `ia3.py`, ...) exports one `Method`
value; `model.py` lists them. Everything generic (freezing, modules_to_save,
the HF PEFT directory layout, strict loading) lives in `model.py`; everything
about the method's math lives in its own file.

Rules a method follows:
- its config is a frozen dataclass with a `modules_to_save: tuple[str, ...]` field;
- every parameter it adds has a path component starting with `prefix`
  ("lora_A", "ia3_l", ...), or one of `extra_prefixes` for a method composed of
  others (MAM: "adapter_" and "prefix_"): that one name filter decides what is trainable and
  what is saved, and the in-memory parameter path is the on-disk key after the
  `base_model.model.` prefix (unless the method maps keys itself: `disk_key`);
- every module of `layer_types` has `disabled: bool` and `merged: bool`
  attributes, and `merge()` / `unmerge()` when the method is mergeable.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Method:
    name: str  # for messages: "LoRA"
    peft_type: str  # HF PEFT's `peft_type`: "LORA"
    prefix: str  # parameter-name prefix: "lora_"
    config_cls: type
    layer_types: tuple[type[nn.Module], ...]
    mergeable: bool
    # Adds the method's modules to `model` (already frozen); returns the adapted paths.
    inject: Callable[[nn.Module, Any], list[str]]
    # The method's own keys of adapter_config.json, for an adapted model.
    to_hf_config: Callable[[nn.Module, Any], dict[str, Any]]
    # A config from adapter_config.json (unknown keys ignored, unsupported features refused).
    from_hf_config: Callable[[dict[str, Any]], Any]
    # A variant sharing another method's peft_type: the adapter_config.json key that is
    # true for it (DoRA: "use_dora" beside LoRA's "LORA"); None for the plain method.
    hf_flag: str | None = None
    # Model-level methods (prompt and prefix tuning) save in HF PEFT's prompt-learning layout,
    # whose keys differ: an in-memory adapter key (modules_to_save infix already dropped) ->
    # its on-disk key. None: "base_model.model.<key>".
    disk_key: Callable[[str], str] | None = None
    # The adapter's tensors as saved, from its trained state {in-memory key: tensor}: prefix
    # tuning replaces its reparameterisation MLP by the prefix it computes. None: as trained.
    export_state: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = (
        None
    )
    # A method composed of others owns their parameter-name prefixes too (MAM: "prefix_").
    extra_prefixes: tuple[str, ...] = ()

    @property
    def prefixes(self) -> tuple[str, ...]:
        """Every parameter-name prefix the method owns: `prefix`, then `extra_prefixes`."""
        return (self.prefix, *self.extra_prefixes)


class WrappedLinear:
    """Mixin for a layer that wraps a Linear/Conv1D as `base_layer`: code that reads
    `layer.weight` or `layer.bias` (dtype checks, weight tying) sees the base layer's."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias
