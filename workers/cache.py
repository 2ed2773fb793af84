"""The per-process base-model cache: a worker loads each base model once and trains on copies.

Bounded by memory: cached models are kept while their parameter + buffer bytes add up to at
most settings.MODEL_CACHE_MB; the least recently used go first, and the model just asked for
always stays (a run is using it). Eviction comes before a load, not after: room is made for
the model's expected bytes (what it took when this process last loaded it, else its weight
files on disk; unknown: every other model goes), so two big models are never in memory at
once on the way to dropping one. The key names the dtype too: the same model in bf16 and
fp32 are two entries.

A copy shares the cached weights. `shared_copy` builds new Module and Parameter objects over
the same storage (requires_grad off), which costs milliseconds and no weight memory, where a
deep copy of SmolLM2 copies 540 MB. A run may wrap modules in place (peft_core.apply), set
requires_grad, move its copy to a GPU (new tensors for the copy only) and add hooks; it must
never write into a base weight in place. merge() would: peft_core.profile merges into private
copies of the weights it touches. The guard: in-place writes through any alias bump a tensor's
version counter, checked on every copy; a cached model written into is loaded again.

The base model's evaluation is kept in PostgreSQL, for every worker (webapp/experiments/
base_evals.py): on a CPU it, not the copy, is most of a warm start.
"""

import copy
import itertools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from django.conf import settings
from torch import nn
from transformers import PreTrainedTokenizerBase

from peft_core.catalogue import CATALOGUE, package_dir
from peft_core.sources import ModelSourceError, model_files
from workers.models import (
    CATALOGUE_SOURCE,
    load_weights,
    weights_directory,
    weights_key,
    weights_of,
)

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    nbytes: int
    versions: tuple[int, ...]  # each parameter's and buffer's version counter at load

    def untouched(self) -> bool:
        return _versions(self.model) == self.versions


_lock = threading.Lock()
_models: OrderedDict[tuple, _Entry] = OrderedDict()
_known_bytes: dict[tuple, int] = {}  # weights_key -> its bytes when this process last loaded it


def base_model_copy(
    model: str | dict,
    task: str,
    num_labels: int,
    *,
    device: str = "cpu",
    dtype=None,
    quantize: str = "none",
):
    """A copy of the cached base model that a run may adapt freely, and the (shared) tokenizer.

    `model` is a run's recorded weights (workers.models.weights_of), or a catalogue key. The
    cached model lives on `device`, in `dtype` if given, else as stored (a bundled model:
    float32): a GPU worker that passes its device copies nothing to the GPU per run. A
    quantised base (nf4, int8) is loaded for the run and not cached: bitsandbytes' packed
    weights and their quantisation state do not survive a shared copy.
    """
    weights = weights_of(model, None) if isinstance(model, str) else model
    if quantize != "none":
        with _lock:
            _evict(limit_bytes() - _expected_bytes(weights))
        return load_weights(
            weights, task, num_labels=num_labels, dtype=dtype, quantize=quantize, device=device
        )
    source = weights_key(weights)
    stored = "float32" if weights["source"] == CATALOGUE_SOURCE else weights.get("dtype")
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else stored or "stored"
    cache_key = (source, task, num_labels, str(device), dtype_name)
    with _lock:
        entry = _models.pop(cache_key, None)
        if entry is not None and not entry.untouched():
            logger.warning("the cached %s was written into in place; loading it again", source)
            entry = None
        if entry is None:
            _evict(limit_bytes() - _expected_bytes(weights))  # room first, then the load
            entry = _load(weights, task, num_labels, device, dtype)
        _models[cache_key] = entry  # the most recently used, kept while a run uses it
        _evict(limit_bytes(), keep=1)
        return shared_copy(entry.model), entry.tokenizer


def _load(weights: dict, task: str, num_labels: int, device: str, dtype) -> _Entry:
    model, tokenizer = load_weights(weights, task, num_labels=num_labels, dtype=dtype)
    model.requires_grad_(False).to(device=device)
    nbytes = model_bytes(model)
    _known_bytes[weights_key(weights)] = nbytes
    return _Entry(model, tokenizer, nbytes, _versions(model))


def _expected_bytes(weights: dict) -> int:
    """What loading these weights will take: as last time, else their files; unknown: the
    whole limit (so every cached model makes room)."""
    known = _known_bytes.get(weights_key(weights))
    if known is not None:
        return known
    on_disk = weight_file_bytes(weights)
    return on_disk if on_disk is not None else limit_bytes()


def weight_file_bytes(weights: dict) -> int | None:
    """The bytes of the model's safetensors files where they already lie (its converted copy
    in the model cache, its package, its registered directory), without loading or converting
    anything."""
    if weights["source"] != CATALOGUE_SOURCE:
        try:
            return model_files(weights_directory(weights)).weight_bytes
        except ModelSourceError:
            return None  # the load will say why
    key = weights["location"]
    for directory in (Path(settings.MODEL_CACHE_DIR) / "models" / key, _package_model_dir(key)):
        files = list(directory.glob("*.safetensors")) if directory and directory.is_dir() else []
        if files:
            return sum(path.stat().st_size for path in files)
    return None


def _package_model_dir(key: str) -> Path | None:
    spec = CATALOGUE.get(key)
    if spec is None or spec.source_kind != "hf-package":
        return None
    found = package_dir(spec.source_detail)
    return found / "model" if found else None


def _evict(limit: int, *, keep: int = 0) -> None:
    """Drop the least recently used models until the rest fit `limit`; the `keep` most
    recently used stay whatever their size (a run is using the newest)."""
    while len(_models) > keep and sum(entry.nbytes for entry in _models.values()) > limit:
        _models.popitem(last=False)


def limit_bytes() -> int:
    return settings.MODEL_CACHE_MB * 2**20


def shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of `model` whose parameters and buffers alias `model`'s storage.

    Parameters are new objects (requires_grad off) so that `.to()`, `requires_grad_()` and
    `.data =` on the copy leave the original alone; tied weights stay tied.
    """
    memo: dict[int, torch.Tensor] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(param.detach(), requires_grad=False)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach()
    return copy.deepcopy(model, memo)


def model_bytes(model: nn.Module) -> int:
    """Parameter + buffer bytes, each storage counted once (tied weights share one)."""
    storages = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _versions(model: nn.Module) -> tuple[int, ...]:
    return tuple(t._version for t in itertools.chain(model.parameters(), model.buffers()))


def cached_bytes() -> int:
    """Bytes the cached base models hold: a run reuses or evicts them, so the pre-flight
    counts them as free."""
    with _lock:
        return sum(entry.nbytes for entry in _models.values())


def cached_keys() -> list[tuple]:
    """(weights key, task, num_labels, device, dtype) of the cached models, least recently
    used first."""
    with _lock:
        return list(_models)


def clear() -> None:
    with _lock:
        _models.clear()
        _known_bytes.clear()
