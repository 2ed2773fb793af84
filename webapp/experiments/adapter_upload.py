"""Check an uploaded adapter in a separate, resource-limited process (`adapter_check`).

The uploaded bytes are untrusted: a "safetensors" file may be a pickle, a header may lie
about its length, a config may name remote code. So the web process never parses them. It
writes them into a private temporary directory under names it chooses (the uploader's file
names are never used), starts `adapter_check.py` with its address space and CPU time capped,
kills it after settings.ADAPTER_CHECK_TIMEOUT_S, and keeps only what the check produced: the
config rebuilt by peft_core and the tensors re-serialised from what it loaded.
"""

import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.template.defaultfilters import filesizeformat

from webapp.experiments import adapter_check

logger = logging.getLogger(__name__)

CHECK_SCRIPT = Path(adapter_check.__file__)
# Address space, not resident memory: a CPU torch with transformers maps about 1 GiB, a CUDA
# build's libraries several more. The tensors are held about three times over.
BASE_MEMORY_BYTES = 8 * 1024**3
TENSOR_COPIES = 4


@dataclass(frozen=True)
class ValidatedAdapter:
    method: str  # peft_core.registry name: "lora"
    method_config: dict  # the config's fields that differ from the method's defaults
    base_model: str  # a catalogue key or a registered model's name
    task: str  # "causal-lm" or "seq-cls"
    num_labels: int
    tensors: int
    parameters: int
    config_bytes: bytes  # adapter_config.json as peft_core writes it
    weights_bytes: bytes  # adapter_model.safetensors, re-serialised


def validate_adapter(
    config_bytes: bytes,
    weights_bytes: bytes,
    *,
    base_model: str = "",
    models: dict | None = None,
    structure_only: bool = False,
) -> ValidatedAdapter:
    """The adapter, checked in a child process; ValidationError naming the problem otherwise.
    `models`: the team's registered models it may name (adapter_check's job, "models").
    `structure_only`: for a base PEFT Lab does not hold, the files alone are checked (valid
    safetensors, a JSON config naming its peft_type), not their shapes against the base."""
    if len(weights_bytes) > settings.ADAPTER_MAX_BYTES:
        raise ValidationError(too_large_message("adapter_model.safetensors"))
    if len(config_bytes) > adapter_check.MAX_CONFIG_BYTES:
        raise ValidationError("adapter_config.json is larger than 256 KiB.")
    with tempfile.TemporaryDirectory(prefix="peftlab-adapter-") as directory:
        folder = Path(directory)
        (folder / adapter_check.CONFIG_NAME).write_bytes(config_bytes)
        (folder / adapter_check.WEIGHTS_NAME).write_bytes(weights_bytes)
        verdict = _run_check(
            folder,
            base_model=base_model,
            models=models or {},
            weights_size=len(weights_bytes),
            structure_only=structure_only,
        )
        if not verdict.get("ok"):
            raise ValidationError(f"The adapter was refused: {verdict.get('error')}.")
        weights = (folder / adapter_check.VALIDATED_NAME).read_bytes()
    return _validated(verdict, weights)


def too_large_message(label: str) -> str:
    return f"{label} is larger than {filesizeformat(settings.ADAPTER_MAX_BYTES)}."


def _run_check(
    folder: Path, *, base_model: str, models: dict, weights_size: int, structure_only: bool
) -> dict:
    timeout = settings.ADAPTER_CHECK_TIMEOUT_S
    job = {
        "dir": str(folder),
        "base_model": base_model,
        "structure_only": structure_only,
        "models": models,
        "max_bytes": settings.ADAPTER_MAX_BYTES,
        "memory_bytes": BASE_MEMORY_BYTES + TENSOR_COPIES * weights_size,
        "cpu_seconds": max(1, int(timeout) + 1),
        "cache_dir": str(settings.MODEL_CACHE_DIR),
    }
    try:
        # subprocess.run kills the child when the timeout expires, then reaps it.
        done = subprocess.run(
            [sys.executable, "-P", str(CHECK_SCRIPT)],
            input=json.dumps(job).encode(),
            capture_output=True,
            timeout=timeout,
            cwd=folder,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ValidationError(
            f"Checking the adapter took too long (over {timeout:g} s); the check was stopped."
        ) from None
    try:
        return json.loads(done.stdout)
    except ValueError:
        logger.warning("adapter check exited %s: %s", done.returncode, done.stderr[-4000:])
        raise ValidationError(
            "The adapter could not be checked within the memory and CPU limits."
        ) from None


def _validated(verdict: dict, weights: bytes) -> ValidatedAdapter:
    config = json.dumps(verdict["config"], indent=2, sort_keys=True) + "\n"
    return ValidatedAdapter(
        method=verdict["method"],
        method_config=verdict["method_config"],
        base_model=verdict["base_model"],
        task=verdict["task"],
        num_labels=verdict["num_labels"],
        tensors=verdict["tensors"],
        parameters=verdict["parameters"],
        config_bytes=config.encode(),
        weights_bytes=weights,
    )
