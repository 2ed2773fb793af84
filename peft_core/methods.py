"""The list of methods, and the contract between `model.py` and one PEFT method file.

Torch-free at import (torch appears in annotations only), so the web reads the method
list without loading torch. `METHOD_LIST` below is the one list of methods: the registry
(`METHOD_CONFIGS`, what the CLI, the forms and the API accept) and `model.METHODS` (the
`Method` of each, imported from its module) are both built from it.

Adding a method takes three edits:
1. its file, `peft_core/<method>.py`: the layers, `inject`, the adapter_config.json mapping
   and `METHOD = Method(...)`; its config dataclass sits beside the others in `configs.py`
   (torch-free, so the web judges values without torch: each field's bounds, default and
   help declared once, with `title` and `mergeable`), and the method file re-exports it;
2. its line in `METHOD_LIST`: the key tools use, the config class, the module;
3. its `MethodCase` in tests/peft_core/method_cases.py, which the shared battery runs.
The CLI, the API and the launch forms then offer it: the web builds its form from the
config's settings (method_forms.generic_method_form) until it wants a hand-made one.

A method file exports one `Method` value; everything generic (freezing, modules_to_save,
the HF PEFT directory layout, strict loading) lives in `model.py`; everything about the
method's math lives in its own file.

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

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peft_core.configs import (
    BottleneckConfig,
    DoraConfig,
    FullFineTuningConfig,
    IA3Config,
    LoraConfig,
    MAMConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from torch import nn


@dataclass(frozen=True)
class MethodEntry:
    """One line of the method list: what the web and the CLI need, without torch."""

    key: str  # how tools name the method: the CLI's --method, the API's "method", a run's
    config_cls: type  # its config in configs.py: `title`, `mergeable`, the fields' settings
    module: str  # the module whose `METHOD` holds the math


METHOD_LIST: tuple[MethodEntry, ...] = (
    MethodEntry("lora", LoraConfig, "peft_core.lora"),
    MethodEntry("dora", DoraConfig, "peft_core.dora"),
    MethodEntry("ia3", IA3Config, "peft_core.ia3"),
    MethodEntry("prompt", PromptTuningConfig, "peft_core.prompt_tuning"),
    MethodEntry("prefix", PrefixTuningConfig, "peft_core.prefix_tuning"),
    MethodEntry("bottleneck", BottleneckConfig, "peft_core.bottleneck"),
    MethodEntry("mam", MAMConfig, "peft_core.mam"),
    MethodEntry("full", FullFineTuningConfig, "peft_core.full"),
)


@dataclass(frozen=True)
class Method:
    peft_type: str  # HF PEFT's `peft_type`: "LORA"
    prefix: str  # parameter-name prefix: "lora_"
    config_cls: type  # its `title` names the method in messages, its `mergeable` says so
    layer_types: tuple[type[nn.Module], ...]
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
    def name(self) -> str:
        """For messages: "LoRA"."""
        return self.config_cls.title

    @property
    def mergeable(self) -> bool:
        return self.config_cls.mergeable

    @property
    def whole_model(self) -> bool:
        """Full fine-tuning (peft_core.full): the model itself trains and is saved whole; no
        layer is injected, none can be switched off or merged."""
        return getattr(self.config_cls, "whole_model", False)

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
