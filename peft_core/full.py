"""Full fine-tuning: every weight of the model trains, nothing is added.

It is the reference row of the trade-off: what the PEFT methods give up in quality, and
save in memory and time, is measured against it on the same data, not quoted. Its method
contract differs from the adapters' in three places (peft_core.model asks `whole_model`):

    apply       nothing is injected and no head is wrapped: the whole model trains
    save        the whole model, as transformers writes it (config.json +
                model.safetensors; tied weights stored once), loadable with
                AutoModel*.from_pretrained and without peft_core
    disabled    refused: the base weights themselves changed, there is no adapter to switch
                off. The base model's behaviour comes from another copy of the base (the
                worker's cache holds one), which peft_core.profile takes as `base`

Memory: the weights, their fp32 gradients and AdamW's two moments, N·(e + 16) bytes for N
parameters, beside activations that every layer keeps (peft_core.preflight).
"""

from typing import Any

from torch import nn

from peft_core.configs import FullFineTuningConfig
from peft_core.methods import Method

__all__ = ["METHOD", "FullFineTuningConfig"]


def _inject(model: nn.Module, config: FullFineTuningConfig) -> list[str]:
    """Nothing is added (peft_core.model.adapt makes every weight trainable); the layers it
    reports as adapted are the model's Linear-likes, each of which now trains whole."""
    from peft_core.graph import linear_layers

    return list(linear_layers(model))


def _to_hf_config(model: nn.Module, config: FullFineTuningConfig) -> dict[str, Any]:
    raise ValueError(
        "a fully fine-tuned model has no adapter_config.json: it is saved as a whole model"
    )


def _from_hf_config(hf: dict[str, Any]) -> FullFineTuningConfig:
    raise ValueError(
        "an adapter_config.json never describes a fully fine-tuned model; load its directory "
        "with transformers' from_pretrained"
    )


METHOD = Method(
    peft_type="FULL",  # never written: HF PEFT has no such adapter type
    prefix="",  # every parameter name: every weight is the method's
    config_cls=FullFineTuningConfig,
    layer_types=(),
    inject=_inject,
    to_hf_config=_to_hf_config,
    from_hf_config=_from_hf_config,
)
