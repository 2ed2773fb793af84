"""The per-process base-model cache: a worker loads each base model once and trains on copies."""

import copy
import threading
from collections import OrderedDict

from django.conf import settings

from peft_core.catalogue import load_model

_MAX_MODELS = 2
_lock = threading.Lock()
_models: OrderedDict[tuple, tuple] = OrderedDict()


def base_model_copy(key: str, task: str, num_labels: int):
    """A fresh, trainable-safe copy of the cached base model and its (shared) tokenizer."""
    cache_key = (key, task, num_labels)
    with _lock:
        if cache_key not in _models:
            _models[cache_key] = load_model(
                key, task, num_labels=num_labels, cache_dir=settings.MODEL_CACHE_DIR
            )
            while len(_models) > _MAX_MODELS:
                _models.popitem(last=False)
        _models.move_to_end(cache_key)
        model, tokenizer = _models[cache_key]
    return copy.deepcopy(model), tokenizer


def clear() -> None:
    with _lock:
        _models.clear()
