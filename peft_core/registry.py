"""Method names as tools speak them ("lora", "prefix", …) and their configs.

The web form, the worker and the CLI all build a config through `build_config`, so a
method added here is offered everywhere.
"""

from collections.abc import Mapping
from typing import Any

from peft_core.bottleneck import BottleneckConfig
from peft_core.dora import DoraConfig
from peft_core.ia3 import IA3Config
from peft_core.lora import LoraConfig
from peft_core.mam import MAMConfig
from peft_core.prefix_tuning import PrefixTuningConfig
from peft_core.prompt_tuning import PromptTuningConfig

METHOD_CONFIGS: dict[str, type] = {
    "lora": LoraConfig,
    "dora": DoraConfig,
    "ia3": IA3Config,
    "prompt": PromptTuningConfig,
    "prefix": PrefixTuningConfig,
    "bottleneck": BottleneckConfig,
    "mam": MAMConfig,
}


def build_config(method: str, fields: Mapping[str, Any], *, tokenizer: Any = None) -> Any:
    """The config of `method` from plain fields; prompt tuning's init text is tokenised here."""
    if method not in METHOD_CONFIGS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_CONFIGS)}")
    config = METHOD_CONFIGS[method](**fields)
    return with_tokenizer(config, tokenizer) if tokenizer is not None else config


def with_tokenizer(config: Any, tokenizer: Any) -> Any:
    """`config` completed by what only the tokenizer knows (prompt tuning's init text ids)."""
    needs_ids = isinstance(config, PromptTuningConfig) and config.init == "text"
    if needs_ids and config.init_token_ids is None:
        return config.tokenize_init_text(tokenizer)
    return config
