"""peft_core: parameter-efficient fine-tuning methods, without Django.

The public API is stable; tools and users rely on it:

    model = peft_core.apply(model, LoraConfig(r=8, alpha=16))   # base frozen, adapter trainable
    peft_core.trainable_parameters(model)                        # -> int
    peft_core.merge(model); peft_core.unmerge(model)
    with peft_core.disabled(model): ...                          # base behaviour
    peft_core.save_adapter(model, "out/")                        # HF PEFT layout
    model = peft_core.load_adapter(model, "out/")
"""

from peft_core.bottleneck import BottleneckConfig
from peft_core.dora import DoraConfig
from peft_core.ia3 import IA3Config
from peft_core.lora import LoraConfig
from peft_core.mam import MAMConfig
from peft_core.model import (
    apply,
    disabled,
    load_adapter,
    load_adapter_files,
    merge,
    save_adapter,
    trainable_parameters,
    unmerge,
)
from peft_core.prefix_tuning import PrefixTuningConfig
from peft_core.prompt_tuning import PromptTuningConfig
from peft_core.registry import METHOD_CONFIGS, build_config

__all__ = [
    "BottleneckConfig",
    "DoraConfig",
    "IA3Config",
    "METHOD_CONFIGS",
    "LoraConfig",
    "MAMConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "apply",
    "build_config",
    "disabled",
    "load_adapter",
    "load_adapter_files",
    "merge",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
]
