"""A catalogue model's architecture on the meta device, for the launch estimates: its config,
its shapes, and the exact trainable parameters of a method on it (every shape, no weights,
no memory). This module imports torch and transformers; `estimates` imports it inside the
functions that count, so a web process loads torch only once someone asks for an estimate.
"""

import copy
import functools
from pathlib import Path

import torch
from django.conf import settings
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
)

import peft_core
from peft_core import preflight
from peft_core.catalogue import CATALOGUE, gguf_source, package_dir, quiet_transformers
from peft_core.configs import TrainConfig
from peft_core.registry import build_config
from peft_core.tiny import tiny_config
from webapp.experiments.estimates import ParamCount, Shape, UnknownArchitecture


def config_path(model_key: str) -> Path | None:
    """Where the model's config.json is, or None when it has none yet. `model_key` is a
    catalogue key, or a registered model's checked directory (an absolute path)."""
    if model_key not in CATALOGUE:
        path = Path(model_key) / "config.json"
        return path if path.is_absolute() and path.is_file() else None
    spec = CATALOGUE[model_key]
    if spec.source_kind == "hf-package":
        found = package_dir(spec.source_detail)
        path = found / "model" / "config.json" if found else None
    else:
        path = Path(settings.MODEL_CACHE_DIR) / "models" / model_key / "config.json"
    return path if path is not None and path.is_file() else None


def model_config(model_key: str) -> PretrainedConfig:
    """A private copy of the model's config, free to change."""
    return copy.deepcopy(_shared_config(model_key))


def _shared_config(model_key: str) -> PretrainedConfig:
    """The model's config, shared between calls: read it, never change it."""
    path = config_path(model_key)
    if path is not None:
        return _read_config(str(path), path.stat().st_mtime_ns)
    if model_key not in CATALOGUE:
        raise UnknownArchitecture(model_key)
    spec = CATALOGUE[model_key]
    if spec.source_kind == "tiny":
        return _tiny_config(spec.source_detail)
    if spec.source_kind == "gguf-package":
        return _gguf_config(model_key)
    raise UnknownArchitecture(model_key)


@functools.lru_cache(maxsize=8)
def _gguf_config(model_key: str) -> PretrainedConfig:
    """The config in the GGUF file's header, as the conversion will write it."""
    try:
        directory, gguf_file = gguf_source(CATALOGUE[model_key])
        with quiet_transformers():
            config = AutoConfig.from_pretrained(
                directory, gguf_file=gguf_file, local_files_only=True
            )
    except (FileNotFoundError, OSError, ValueError) as exc:  # the package is not installed
        raise UnknownArchitecture(model_key) from exc
    if hasattr(config, "quantization_config"):  # as _write_gguf_model drops it
        del config.quantization_config
    return config


@functools.lru_cache(maxsize=8)
def _tiny_config(kind: str) -> PretrainedConfig:
    return tiny_config(kind)


@functools.lru_cache(maxsize=32)
def _read_config(path: str, mtime_ns: int) -> PretrainedConfig:
    with quiet_transformers():
        return AutoConfig.from_pretrained(
            Path(path).parent, local_files_only=True, trust_remote_code=False
        )


def model_shape(model_key: str) -> Shape:
    config = _shared_config(model_key)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Shape(
        hidden=int(text.hidden_size),
        layers=int(text.num_hidden_layers),
        vocab=int(text.vocab_size),
    )


def parameter_count(
    *, model_key: str, task: str, num_labels: int, method: str, config: dict
) -> ParamCount:
    """Trainable and total parameters of `method` on the model; raises UnknownArchitecture."""
    path = config_path(model_key)
    version = path.stat().st_mtime_ns if path else 0
    if path is None:
        _shared_config(model_key)  # raises UnknownArchitecture when there is none
    key = tuple(sorted((name, _hashable(value)) for name, value in config.items()))
    return _count(model_key, version, task, num_labels, method, key)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


@functools.lru_cache(maxsize=512)
def _count(
    model_key: str, version: int, task: str, num_labels: int, method: str, key: tuple
) -> ParamCount:
    model = _meta_model(model_key, task, num_labels)
    fields = dict(key)
    if method == "prompt":  # the init text changes the values, not the count
        fields = {k: v for k, v in fields.items() if k != "init_text"} | {"init": "random"}
    peft_core.apply(model, build_config(method, fields))
    total = sum(p.numel() for p in model.parameters())
    layer_types = peft_core.model.method_of(model).layer_types
    adapted = [path for path, module in model.named_modules() if isinstance(module, layer_types)]
    return ParamCount(
        trainable=peft_core.trainable_parameters(model), total=total, modules=tuple(adapted)
    )


def preflight_estimate(
    *, model_key: str, task: str, num_labels: int, method: str, config: dict, train: dict
):
    """peft_core.preflight's estimate of the run's peak memory (CPU workspace, `auto`
    precision counted as fp32); raises UnknownArchitecture."""
    path = config_path(model_key)
    version = path.stat().st_mtime_ns if path else 0
    model_config(model_key)  # raises UnknownArchitecture when there is none
    key = tuple(sorted((name, _hashable(value)) for name, value in config.items()))
    train_key = tuple(sorted((name, _hashable(value)) for name, value in train.items()))
    return _preflight(model_key, version, task, num_labels, method, key, train_key)


@functools.lru_cache(maxsize=512)
def _preflight(
    model_key: str, version: int, task: str, num_labels: int, method: str, key: tuple, train: tuple
):
    fields = dict(key)
    if method == "prompt":  # the init text changes the values, not the count
        fields = {k: v for k, v in fields.items() if k != "init_text"} | {"init": "random"}
    return preflight.estimate_for_run(
        model_config(model_key),
        TrainConfig(**dict(train)),
        build_config(method, fields),
        "cpu",
        task=task,
        num_labels=num_labels,
    )


def _meta_model(model_key: str, task: str, num_labels: int) -> torch.nn.Module:
    """The model's architecture on the meta device: shapes only, no memory, no weights."""
    config = model_config(model_key)
    if task == "seq-cls":
        config.num_labels = num_labels
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"), quiet_transformers():
        return auto.from_config(config, dtype=torch.float32)
