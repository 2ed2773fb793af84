"""Method names as tools speak them ("lora", "prefix", …) and their configs, torch-free.

The web form, the API, the worker and the CLI all build a config through `build_config`,
so one judge refuses a bad value everywhere, and a method added to methods.METHOD_LIST is
offered everywhere. The web asks `METHOD_CONFIGS[key].mergeable` and `.title` without
importing torch.
"""

from collections.abc import Mapping
from typing import Any

from peft_core.configs import PromptTuningConfig
from peft_core.methods import METHOD_LIST

METHOD_CONFIGS: dict[str, type] = {entry.key: entry.config_cls for entry in METHOD_LIST}


def build_config(method: str, fields: Mapping[str, Any], *, tokenizer: Any = None) -> Any:
    """The config of `method` from plain fields; prompt tuning's init text is tokenised here.

    A refused value raises checks.ConfigError (a ValueError naming the field)."""
    if method not in METHOD_CONFIGS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_CONFIGS)}")
    config = METHOD_CONFIGS[method](**fields)
    return with_tokenizer(config, tokenizer) if tokenizer is not None else config


def whole_model(method: str) -> bool:
    """Whether `method` trains the model itself (full fine-tuning): its run stores a whole
    model (config.json, model.safetensors, the tokenizer), not an adapter."""
    return bool(getattr(METHOD_CONFIGS.get(method), "whole_model", False))


def with_tokenizer(config: Any, tokenizer: Any) -> Any:
    """`config` completed by what only the tokenizer knows (prompt tuning's init text ids)."""
    needs_ids = isinstance(config, PromptTuningConfig) and config.init == "text"
    if needs_ids and config.init_token_ids is None:
        return config.tokenize_init_text(tokenizer)
    return config
