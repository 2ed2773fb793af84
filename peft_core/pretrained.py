"""A model in a directory of one's own: load it, and inspect it without loading a weight.

`load_directory` loads a checked directory (sources.model_files) in its stored dtype, or the
dtype asked for: a bf16 checkpoint is never silently upcast to float32. `trust_remote_code`
is never set, and only safetensors weights are read.

`inspect_directory` builds the model from its config on the meta device (no weights, a few
seconds even for 70 B parameters) and reports what the model page shows and what the launch
form previews: architecture, tasks, parameter count, layers, hidden size, context length,
stored dtype, chat template, every Linear with its shape, and where each method goes
(structure.describe).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_core.catalogue import HEAD_INIT_SEED, load_tokenizer, quiet_transformers
from peft_core.sources import ModelSourceError, model_files

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx")


def load_config(directory: str | Path) -> PretrainedConfig:
    """The model's config through transformers (its own classes only, never remote code)."""
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(
                directory, local_files_only=True, trust_remote_code=False
            )
    except (ValueError, KeyError, OSError) as error:
        raise ModelSourceError(f"transformers cannot read this model's config: {error}") from error


def model_tasks(config: PretrainedConfig) -> tuple[str, ...]:
    """The tasks PEFT Lab can train this model for: causal-lm when it is a decoder with an LM
    head class, seq-cls when transformers has a sequence-classification head for it."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    kind = config.model_type
    architectures = tuple(getattr(config, "architectures", None) or ())
    declared_causal = any(name.endswith(CAUSAL_SUFFIXES) for name in architectures)
    encoder = bool(architectures) and not declared_causal
    tasks = []
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not encoder and not config.is_encoder_decoder:
        tasks.append("causal-lm")
    if kind in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        tasks.append("seq-cls")
    return tuple(tasks)


def _auto_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification


def resolve_dtype(stored: str, asked: str | None = None) -> torch.dtype:
    """The dtype to load in: the one asked for, else the stored one (float32 when unknown)."""
    import torch

    name = asked or stored or "float32"
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelSourceError(f"{name!r} is not a floating-point dtype")
    return dtype


def quantization_config(quantize: str, compute_dtype: torch.dtype | None = None) -> Any:
    """bitsandbytes' config for "nf4" (QLoRA: 4-bit NormalFloat, double quantisation) or
    "int8" (LLM.int8); None for "none"."""
    if quantize in (None, "none"):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelSourceError(f"quantize {quantize} needs bitsandbytes: pip install bitsandbytes")
    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
        )
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelSourceError(f"quantize must be none, nf4 or int8, got {quantize!r}")


def is_quantized(model: nn.Module) -> bool:
    return bool(
        getattr(model, "is_quantized", False) or getattr(model, "quantization_method", None)
    )


def load_directory(
    directory: str | Path,
    task: str,
    *,
    num_labels: int = 2,
    dtype: str | None = None,
    quantize: str = "none",
    device: str = "cpu",
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model (eval mode) and tokenizer for `task`, in its stored dtype unless `dtype`;
    with `quantize`, its linears in bitsandbytes' NF4 or int8, placed on `device`."""
    import torch

    files = model_files(directory)
    config = load_config(directory)
    tasks = model_tasks(config)
    if task not in tasks:
        offered = ", ".join(tasks) or "no task PEFT Lab trains"
        raise ModelSourceError(f"{config.model_type} models support {offered}, not {task}")
    tokenizer = load_tokenizer(Path(directory))
    kwargs: dict[str, Any] = {
        "local_files_only": True,
        "trust_remote_code": False,
        "use_safetensors": True,
        "dtype": resolve_dtype(files.dtype, dtype),
    }
    if task == "seq-cls":
        kwargs["num_labels"] = num_labels
    bnb = quantization_config(
        quantize, kwargs["dtype"] if kwargs["dtype"] != torch.float32 else None
    )
    if bnb is not None:
        kwargs |= {"quantization_config": bnb, "device_map": {"": device}}
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(HEAD_INIT_SEED)  # a new classifier head, the same on every load
        model = _auto_class(task).from_pretrained(directory, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if bnb is not None:
        keep_cpu_weights_trainable(model)
    return model.eval(), tokenizer


def keep_cpu_weights_trainable(model: nn.Module) -> None:
    """bitsandbytes repacks a 4-bit weight for CPU inference, one way, on the first forward
    in eval mode; a backward through the repacked weight gives no gradient to the layer's
    input, so an adapter below it would learn nothing. Training evaluates in eval mode, so
    the repacking stays off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def meta_model(config: PretrainedConfig, task: str) -> nn.Module:
    """The model built from `config` on the meta device: its modules and shapes, no memory."""
    import torch

    with torch.device("meta"), quiet_transformers():
        return _auto_class(task).from_config(config)


def inspect_directory(directory: str | Path) -> dict[str, Any]:
    """What the model page shows, as JSON: see the module docstring."""
    from peft_core.inspection import describe

    files = model_files(directory)
    config = load_config(directory)
    tasks = model_tasks(config)
    if not tasks:
        raise ModelSourceError(
            f"{config.model_type} is neither a decoder with a causal-LM head nor a model with a "
            "sequence-classification head in transformers: PEFT Lab cannot train it"
        )
    per_task, parameters = {}, None
    for task in tasks:
        try:
            model = meta_model(config, task)
        except Exception as error:  # transformers raises what the config's code raises
            raise ModelSourceError(f"transformers cannot build this model: {error}") from error
        if parameters is None:  # the first task's model: a causal LM's counts its LM head
            parameters = sum(p.numel() for p in model.parameters())
        per_task[task] = {"class": type(model).__name__, **describe(model)}
    first = per_task[tasks[0]]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "model_type": config.model_type,
        "architectures": list(files.architectures),
        "tasks": list(tasks),
        "parameters": parameters,
        "layers": getattr(text, "num_hidden_layers", None) or first.get("layers"),
        "hidden_size": getattr(text, "hidden_size", None),
        "heads": getattr(text, "num_attention_heads", None),
        "kv_heads": getattr(text, "num_key_value_heads", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "context_length": next(
            (getattr(text, key) for key in CONTEXT_KEYS if getattr(text, key, None)), None
        ),
        "dtype": files.dtype,
        "weight_bytes": files.weight_bytes,
        "has_chat_template": files.has_chat_template,
        "content_sha256": files.content_sha256,
        "heads_by_task": {task: info["class"] for task, info in per_task.items()},
        "structure": per_task,
    }
