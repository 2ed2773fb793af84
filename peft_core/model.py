"""Apply, merge, disable, save and load PEFT adapters: the method-independent part.

    apply(model, config)     freeze W0, inject the method's modules, train modules_to_save
    merge / unmerge          fold the adapter into W0 and back (mergeable methods, unquantised base)
    disabled(model)          base behaviour inside the `with` block
    save_adapter / load_adapter
                             HF PEFT's directory layout: adapter_config.json +
                             adapter_model.safetensors, keys "base_model.model.<path>"

modules_to_save (e.g. a classification head) are wrapped: `original_module`
stays frozen, `trained_module` is a trainable copy saved with the adapter under
the head's own path (HF PEFT writes `base_model.model.classifier.weight`, with
neither "modules_to_save" nor the adapter name in the key). A
*ForSequenceClassification model gets its head added to modules_to_save.
"""

import copy
import dataclasses
import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file, save_file
from torch import nn

from peft_core.methods import METHOD_LIST, Method
from peft_core.targets import classifier_head, matches_suffix, resolve_modules_to_save

# The Method of every entry of the one method list, in its order.
METHODS: tuple[Method, ...] = tuple(import_module(entry.module).METHOD for entry in METHOD_LIST)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
CONFIG_ATTR = "peft_core_config"
# A fully fine-tuned model's files, as transformers writes them (save_model)
MODEL_CONFIG_FILE = "config.json"
MODEL_WEIGHTS_FILE = "model.safetensors"
MODEL_INDEX_FILE = "model.safetensors.index.json"


class TrainedCopy(nn.Module):
    """A modules_to_save wrapper: a frozen original and a trainable copy used in forward."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.trained_module = copy.deepcopy(module)
        self.disabled = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        module = self.original_module if self.disabled else self.trained_module
        return module(*args, **kwargs)


# ---------------------------------------------------------------- methods


def method_for_config(config: Any) -> Method:
    # The exact class: DoraConfig subclasses LoraConfig but is its own method.
    for method in METHODS:
        if type(config) is method.config_cls:
            return method
    raise TypeError(f"{type(config).__name__} is not a peft_core method config")


def method_for_hf_config(hf: dict[str, Any]) -> Method:
    """The method of an adapter_config.json: its peft_type, then a variant's flag (use_dora)."""
    peft_type = hf.get("peft_type")
    adapters = [m for m in METHODS if not m.whole_model]
    candidates = [m for m in adapters if m.peft_type == peft_type]
    if not candidates:
        known = ", ".join(dict.fromkeys(m.peft_type for m in adapters))
        raise ValueError(
            f"peft_type {peft_type!r} is not supported by peft_core (supported: {known})"
        )
    flagged = [m for m in candidates if m.hf_flag is not None and hf.get(m.hf_flag)]
    plain = [m for m in candidates if m.hf_flag is None]
    return (flagged or plain)[0]


def method_of(model: nn.Module) -> Method:
    if not hasattr(model, CONFIG_ATTR):
        raise ValueError("this model has no peft_core adapter; call peft_core.apply first")
    return method_for_config(getattr(model, CONFIG_ATTR))


# ---------------------------------------------------------------- apply


def apply(model: nn.Module, config: Any) -> nn.Module:
    """Freeze `model`, add the adapter `config` describes, return the same model object."""
    adapt(model, config)
    return model


def adapt(model: nn.Module, config: Any) -> list[str]:
    """`apply`, returning the module paths the method adapted (its `inject`'s answer)."""
    if hasattr(model, CONFIG_ATTR):
        raise ValueError("this model already has a peft_core adapter; apply to a fresh base model")
    method = method_for_config(config)
    if method.whole_model:  # full fine-tuning: the model itself trains (peft_core.full)
        trained = method.inject(model, config)
        model.requires_grad_(True)
        setattr(model, CONFIG_ATTR, config)
        return trained
    config = _with_classifier_head(model, config)
    heads = _modules_to_save_paths(model, config.modules_to_save)
    model.requires_grad_(False)
    before = {id(module) for module in model.modules()}
    adapted = method.inject(model, config)
    for path in heads:
        model.set_submodule(path, TrainedCopy(model.get_submodule(path)))
    _follow_mode(model, before)
    for name, param in model.named_parameters():
        param.requires_grad_(_is_adapter_key(name, method))
    setattr(model, CONFIG_ATTR, config)
    return adapted


def _follow_mode(model: nn.Module, before: set[int]) -> None:
    """Put the modules apply added in the model's mode: a new module starts in training mode,
    so an adapter loaded into an eval model would otherwise apply its dropout at inference."""
    for module in model.modules():
        if id(module) not in before:
            module.training = model.training


def _with_classifier_head(model: nn.Module, config: Any) -> Any:
    head = classifier_head(model)
    if head is None or head in config.modules_to_save:
        return config
    return dataclasses.replace(config, modules_to_save=(*config.modules_to_save, head))


def _modules_to_save_paths(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    paths = resolve_modules_to_save(model, names)
    missing = [name for name in names if not any(matches_suffix(p, [name]) for p in paths)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of this model")
    return paths


def _is_adapter_key(key: str, method: Method) -> bool:
    """A parameter/state key the adapter owns: the method's prefixes or a modules_to_save copy."""
    parts = key.split(".")
    return "trained_module" in parts or any(p.startswith(method.prefixes) for p in parts)


def is_whole_model(model: nn.Module) -> bool:
    """Whether `model` was fully fine-tuned (peft_core.full): no adapter, saved whole."""
    return hasattr(model, CONFIG_ATTR) and method_of(model).whole_model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- merge / disable


def _layers(model: nn.Module, method: Method) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, method.layer_types)]


def _mergeable_layers(model: nn.Module) -> list[nn.Module]:
    method = method_of(model)
    if method.whole_model:
        raise ValueError(
            "a fully fine-tuned model has no adapter to merge: its own weights trained, and it "
            "already runs at the base model's cost"
        )
    if not method.mergeable:
        raise ValueError(
            f"{method.name} adapters cannot be merged into the base weights; "
            "keep the adapter attached (or use peft_core.disabled for the base model)"
        )
    return _layers(model, method)


# bitsandbytes' packed weight classes, by the quantisation they hold
PACKED_WEIGHTS = {"Params4bit": "4-bit (nf4)", "Int8Params": "int8"}


def merge(model: nn.Module) -> None:
    """Fold every adapter layer into its base weight; forward then costs what the base costs.
    A quantised base is refused, saying so: W0 + ΔW would have to be dequantised and packed
    again, and the repacking rounds the merged weight, so the outputs would change."""
    layers = _mergeable_layers(model)
    packed = {PACKED_WEIGHTS.get(type(layer.base_layer.weight).__name__) for layer in layers}
    if packed - {None}:
        raise ValueError(
            f"merging into a quantised base ({', '.join(sorted(packed - {None}))}) is refused: "
            "its weights are packed, and repacking W0 + ΔW would round away part of the "
            "adapter. Load the base unquantised (quantize none) and merge there, as merged "
            "exports do; unmerged, the adapter works as it is on either base."
        )
    for layer in layers:
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo `merge`: subtract the adapter from the base weights again."""
    for layer in _mergeable_layers(model):
        layer.unmerge()


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model behaves as its base model (adapters off, original heads)."""
    method = method_of(model)
    if method.whole_model:
        raise ValueError(
            "full fine-tuning changed the base weights themselves: there is no adapter to "
            "switch off. Load the base model again for its behaviour"
        )
    switches = _layers(model, method) + [m for m in model.modules() if isinstance(m, TrainedCopy)]
    merged = [m for m in switches if getattr(m, "merged", False)]
    before = [m.disabled for m in switches]
    for m in merged:
        m.unmerge()
    for m in switches:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was_disabled in zip(switches, before, strict=True):
            m.disabled = was_disabled
        for m in merged:
            m.merge()


# ---------------------------------------------------------------- save / load


def _disk_key(key: str, method: Method) -> str:
    """In-memory key -> HF PEFT key: drop our modules_to_save infix, add the prefix."""
    key = key.replace(".trained_module.", ".")
    return method.disk_key(key) if method.disk_key is not None else KEY_PREFIX + key


def adapter_key_map(model: nn.Module) -> dict[str, str]:
    """On-disk key -> in-memory state_dict key, for every tensor the adapter owns."""
    method = method_of(model)
    keys = [k for k in model.state_dict() if _is_adapter_key(k, method)]
    return {_disk_key(k, method): k for k in keys}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors as saved, under their HF PEFT keys (CPU, contiguous)."""
    method = method_of(model)
    state = {k: v for k, v in model.state_dict().items() if _is_adapter_key(k, method)}
    if method.export_state is not None:
        state = method.export_state(model, state)
    return {
        _disk_key(key, method): tensor.detach().to("cpu").contiguous()
        for key, tensor in state.items()
    }


def task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    return None


def hf_config(
    model: nn.Module, base_model_name_or_path: str | None = None, revision: str | None = None
) -> dict[str, Any]:
    """The adapter_config.json content HF PEFT reads for this adapted model; `revision` is
    the base model's Hub revision (a commit sha pins the exact weights)."""
    method = method_of(model)
    config = getattr(model, CONFIG_ATTR)
    name = base_model_name_or_path or getattr(model, "name_or_path", None) or None
    return {
        "peft_type": method.peft_type,
        "task_type": task_type(model),
        "base_model_name_or_path": name,
        **({"revision": revision} if revision else {}),
        "inference_mode": True,
        "modules_to_save": list(config.modules_to_save) or None,
        **method.to_hf_config(model, config),
    }


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
) -> None:
    """Write adapter_config.json + adapter_model.safetensors (HF PEFT's layout) to `directory`;
    a fully fine-tuned model is written whole, as transformers writes a model (save_model)."""
    if is_whole_model(model):
        save_model(model, directory)
        return
    directory = Path(directory)
    config = hf_config(model, base_model_name_or_path, revision)
    tensors = adapter_state_dict(model)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})


def save_model(model: nn.Module, directory: str | Path) -> None:
    """A fully fine-tuned model as transformers saves one: config.json, model.safetensors
    (tied weights once; shards and their index beyond transformers' shard size) and
    generation_config.json where the model has one. from_pretrained loads it, peft_core not
    needed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)


def is_model_directory(names: Iterable[str]) -> bool:
    """Whether files named `names` are a whole model (full fine-tuning), not an adapter."""
    names = set(names)
    weights = MODEL_WEIGHTS_FILE in names or MODEL_INDEX_FILE in names
    return MODEL_CONFIG_FILE in names and weights and CONFIG_FILE not in names


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return config


def _config_from_hf(model: nn.Module, hf: dict[str, Any]) -> Any:
    """Our config for `hf`, keeping only the modules_to_save names present in `model`.

    HF PEFT lists both "classifier" and "score" for any SEQ_CLS adapter.
    """
    config = method_for_hf_config(hf).from_hf_config(hf)
    present = {p for p, _ in model.named_modules() if p}
    names = tuple(n for n in config.modules_to_save if any(matches_suffix(p, [n]) for p in present))
    return dataclasses.replace(config, modules_to_save=names)


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the adapter saved in `directory` (by peft_core or HF PEFT) to a fresh `model`.

    Weights load strictly: a missing, unexpected or mis-shaped tensor is an error.
    """
    config = _config_from_hf(model, read_hf_config(directory))
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory} (pickled .bin is never loaded)")
    tensors = load_file(weights)
    apply(model, config)
    load_adapter_tensors(model, tensors, source=str(weights))
    return model


def load_adapter_files(model: nn.Module, files: Mapping[str, bytes]) -> nn.Module:
    """load_adapter from the two files' bytes, {file name: bytes} (nothing on disk)."""
    if is_model_directory(files):
        raise ValueError(
            "these files are a fully fine-tuned model, not an adapter: load them with "
            "transformers' from_pretrained (peft_core.pretrained.load_directory)"
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if name not in files:
            raise FileNotFoundError(f"no {name} among the adapter's files")
    hf = json.loads(files[CONFIG_FILE])
    if not isinstance(hf, dict):
        raise ValueError(f"{CONFIG_FILE} does not hold a JSON object")
    config = _config_from_hf(model, hf)
    tensors = load(files[WEIGHTS_FILE])
    apply(model, config)
    load_adapter_tensors(model, tensors, source=WEIGHTS_FILE)
    return model


def _check_keys(expected: dict[str, str], tensors: dict[str, torch.Tensor], source: str) -> None:
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"adapter weights in {source} do not fit this model: "
            f"missing {len(missing)} {missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]}"
        )


@torch.no_grad()
def load_adapter_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Copy HF-PEFT-keyed `tensors` into an adapted model, strictly."""
    expected = adapter_key_map(model)
    _check_keys(expected, tensors, source)
    state = model.state_dict()
    for disk, key in expected.items():
        target, value = state[key], tensors[disk]
        if target.shape != value.shape:
            raise ValueError(
                f"{disk} in {source} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(target.shape)} (was the adapter trained on another model size?)"
            )
        target.copy_(value)


# ---------------------------------------------------------------- merge and unload


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights and remove every trace of it (mergeable methods).

    Each adapter layer gives way to its `base_layer`, each modules_to_save wrapper to its
    trained copy, and the peft_core config goes: what is left is the plain transformers
    model, which `save_pretrained` writes and `from_pretrained` loads without peft_core.
    The adapted model is consumed; its base weights are written into, so never call this
    on a model sharing its weights with another (workers.cache copies do).
    """
    merge(model)
    method = method_of(model)
    layers = [path for path, m in model.named_modules() if isinstance(m, method.layer_types)]
    for path in layers:
        model.set_submodule(path, model.get_submodule(path).base_layer)
    copies = [path for path, m in model.named_modules() if isinstance(m, TrainedCopy)]
    for path in copies:
        model.set_submodule(path, model.get_submodule(path).trained_module)
    delattr(model, CONFIG_ATTR)
    return model
