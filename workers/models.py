"""Where a run's base model lies, and loading it: from what the run recorded of it.

A run copies its registry row's source when it is created (`Run.base_weights`): the
catalogue key, the directory, or the Hub id with the commit it resolved to, and the content
hash of the config and weights' index. A worker loads exactly that, and checks it first: a
directory must still lie under an allowed root, and a content hash that no longer matches
(the files were replaced after registration) fails the run with the reason instead of
training on other weights. Runs from before the registry record nothing: their base_model
is a catalogue key.
"""

from pathlib import Path

from django.conf import settings

from peft_core.catalogue import CATALOGUE, model_dir, upstream_name
from peft_core.sources import (
    HubRef,
    ModelSourceError,
    hub_snapshot,
    local_directory,
    model_files,
)

CATALOGUE_SOURCE = "catalogue"


def weights_of(base_model: str, base_weights: dict | None) -> dict:
    """A run's recorded weights; a catalogue key's when it recorded none."""
    if base_weights and base_weights.get("source"):
        return base_weights
    return {"name": base_model, "source": CATALOGUE_SOURCE, "location": base_model}


def upstream_of(weights: dict) -> tuple[str, str | None]:
    """What a saved adapter names as its base, (base_model_name_or_path, revision), so that
    `AutoPeftModel*.from_pretrained(adapter_dir)` resolves it: a bundled model's Hub twin, a
    Hub model's id at its resolved commit, a local model's directory."""
    if weights["source"] == CATALOGUE_SOURCE:
        return upstream_name(weights["location"]), None
    if weights["source"] == "hub":
        return weights["location"], weights.get("commit") or weights.get("revision") or None
    return weights["location"], None


def weights_key(weights: dict) -> tuple:
    """What names these weights in a cache: source, place, commit and content hash."""
    return (
        weights["source"],
        weights["location"],
        weights.get("commit", ""),
        weights.get("content_sha256", ""),
    )


def weights_directory(weights: dict, *, download: bool = False) -> Path:
    """The HF-layout directory holding `weights`, checked; ModelSourceError when it is gone,
    outside the roots, or no longer what was registered."""
    source, location = weights["source"], weights["location"]
    if source == CATALOGUE_SOURCE:
        if location not in CATALOGUE:
            raise ModelSourceError(f"{location} is not a bundled model here")
        return model_dir(location, cache_dir=settings.MODEL_CACHE_DIR)
    if source == "local":
        directory = local_directory(location, settings.MODEL_ROOTS)
    elif source == "hub":
        ref = HubRef(location, weights.get("commit") or weights.get("revision") or "main")
        snapshot = hub_snapshot(ref, settings.HF_HUB_CACHE, offline=None if download else True)
        directory = local_directory(str(snapshot), [settings.HF_HUB_CACHE])
    else:
        raise ModelSourceError(f"unknown model source {source!r}")
    expected = weights.get("content_sha256")
    if expected and model_files(directory).content_sha256 != expected:
        raise ModelSourceError(
            f"the files of {weights.get('name') or location} changed since it was registered "
            f"(config or weight layout differs): register it again to train on the new files"
        )
    return directory


def load_weights(
    weights: dict, task: str, *, num_labels: int = 2, dtype=None, quantize="none", device="cpu"
):
    """The base model (eval mode) and tokenizer: a bundled one in float32 unless `dtype`, a
    registered one in its stored dtype unless `dtype` (never upcast behind the user's back);
    with `quantize` (nf4, int8) its linears in bitsandbytes' format, already on `device`."""
    import torch

    from peft_core.catalogue import load_model
    from peft_core.pretrained import load_directory

    if quantize != "none":
        name = str(dtype).removeprefix("torch.") if dtype is not None else None
        directory = weights_directory(weights)
        return load_directory(
            directory, task, num_labels=num_labels, dtype=name, quantize=quantize, device=device
        )
    if weights["source"] == CATALOGUE_SOURCE:
        model, tokenizer = load_model(
            weights["location"], task, num_labels=num_labels, cache_dir=settings.MODEL_CACHE_DIR
        )
        return model.to(dtype or torch.float32), tokenizer
    name = str(dtype).removeprefix("torch.") if dtype is not None else None
    return load_directory(weights_directory(weights), task, num_labels=num_labels, dtype=name)
