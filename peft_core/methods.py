"""The contract between `model.py` and one PEFT method file.

A method file (`lora.py`, later `dora.py`, `ia3.py`, ...) exports one `Method`
value; `model.py` lists them. Everything generic (freezing, modules_to_save,
the HF PEFT directory layout, strict loading) lives in `model.py`; everything
about the method's math lives in its own file.

Rules a method follows:
- its config is a frozen dataclass with a `modules_to_save: tuple[str, ...]` field;
- every parameter it adds has a path component starting with `prefix`
  ("lora_A", "ia3_l", ...): that one name filter decides what is trainable and
  what is saved, and the in-memory parameter path is the on-disk key after the
  `base_model.model.` prefix;
- every module of `layer_types` has `disabled: bool` and `merged: bool`
  attributes, and `merge()` / `unmerge()` when the method is mergeable.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
