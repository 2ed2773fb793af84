"""peft_core: parameter-efficient fine-tuning methods, without Django.

The public API is stable; tools and users rely on it:

    model = peft_core.apply(model, LoraConfig(r=8, alpha=16))   # base frozen, adapter trainable
    peft_core.trainable_parameters(model)                        # -> int
    peft_core.merge(model); peft_core.unmerge(model)
    with peft_core.disabled(model): ...                          # base behaviour
    peft_core.save_adapter(model, "out/")                        # HF PEFT layout
    peft_core.apply(model, FullFineTuningConfig())    # every weight trains; saved whole
    model = peft_core.load_adapter(model, "out/")
    peft_core.describe(meta_model)       # JSON: Linear-like modules, each method's footprint

The names load on first use (PEP 562), so `import peft_core.configs` or
`peft_core.registry` does not import torch: the web process judges configs and lists
methods and models without it, and imports torch only where it runs a model.
"""

from importlib import import_module
from importlib.util import find_spec
from typing import Any

# Public name -> the module that defines it.
_EXPORTS = {
    **dict.fromkeys(
        (
            "BottleneckConfig",
            "DoraConfig",
            "FullFineTuningConfig",
            "IA3Config",
            "LoraConfig",
            "MAMConfig",
            "PrefixTuningConfig",
            "PromptTuningConfig",
        ),
        "peft_core.configs",
    ),
    **dict.fromkeys(("METHOD_CONFIGS", "build_config"), "peft_core.registry"),
    "describe": "peft_core.inspection",
    **dict.fromkeys(
        (
            "apply",
            "disabled",
            "is_whole_model",
            "load_adapter",
            "load_adapter_files",
            "merge",
            "save_adapter",
            "save_model",
            "trainable_parameters",
            "unmerge",
        ),
        "peft_core.model",
    ),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """A public name from its module, or a submodule (`peft_core.model`), imported now."""
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
    elif find_spec(f"{__name__}.{name}") is not None:
        value = import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
