"""The child process that checks an uploaded adapter: no Django, resource limits, a JSON verdict.

    python -P webapp/experiments/adapter_check.py  < job.json  > verdict.json

The parent (`webapp.experiments.adapter_upload`) writes the two uploaded files into a private
temporary directory under names it chose, and sends the job on stdin:
{"dir", "base_model", "models", "max_bytes", "memory_bytes", "cpu_seconds", "cache_dir"}, where
"models" holds the uploading team's registered models ({name: {"dir", "tasks", "aliases",
"upstream", "revision"}}, their directories checked by the parent). This process
caps its own address space and CPU time before it imports torch, then:

1. refuses anything that is not a safetensors file: the 8-byte header length and the JSON
   header (dtypes, shapes, offsets) are checked before `safetensors` parses a byte, so a pickle
   or a torch zip renamed .safetensors is "not a safetensors file" and is never unpickled;
2. parses adapter_config.json (size and nesting bounded), requires a `peft_type` peft_core
   supports and a base model from the catalogue or the team's registry, by name, Hub id or
   directory (the form's choice wins over the file's);
3. builds the base model's architecture on the meta device (shapes only, no weights, no
   download, never remote code), applies peft_core's config rebuilt from the file, and loads
   the tensors with peft_core's strict key and shape check;
4. writes the tensors it loaded, re-serialised, to `validated.safetensors` and prints
   {"ok": true, ...} with the config rebuilt by peft_core (unknown keys are gone), or
   {"ok": false, "error": "..."}.

The meta-device build is deliberate: it checks every key and shape the real model would, in
well under a second even for the largest catalogue model, and allocates no weights.
"""

import json
import math
import resource
import sys
from pathlib import Path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
VALIDATED_NAME = "validated.safetensors"

MAX_CONFIG_BYTES = 256 * 1024
MAX_CONFIG_DEPTH = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own bound
MAX_TENSORS = 20_000
MAX_NAME_CHARS = 500
MAX_DIMS = 8
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
TASK_TYPES = {None: "causal-lm", "CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls"}
NOT_SAFETENSORS = "not a safetensors file"


class AdapterError(ValueError):
    """A refusal the uploader reads: what is wrong with their files."""


def main() -> int:
    job = json.loads(sys.stdin.read())
    _limit_resources(memory_bytes=job["memory_bytes"], cpu_seconds=job["cpu_seconds"])
    # Run as a script with -P: put the project root first so peft_core imports from a checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    verdict_out, sys.stdout = sys.stdout, sys.stderr  # library chatter must not mix in
    try:
        verdict = {"ok": True, **check(job)}
    except AdapterError as exc:
        verdict = {"ok": False, "error": str(exc)[:2000]}
    except MemoryError:
        verdict = {"ok": False, "error": "the adapter is too large to check in memory"}
    verdict_out.write(json.dumps(verdict))
    verdict_out.flush()
    return 0


def _limit_resources(*, memory_bytes: int, cpu_seconds: int) -> None:
    """Lower (never raise) the address-space, CPU-time and core-dump limits."""
    for kind, soft, hard in (
        (resource.RLIMIT_AS, memory_bytes, memory_bytes),
        (resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        current = resource.getrlimit(kind)[1]
        cap = hard if current == resource.RLIM_INFINITY else min(hard, current)
        resource.setrlimit(kind, (min(soft, cap), cap))


def check(job: dict) -> dict:
    directory = Path(job["dir"])
    weights_data = _read(directory / WEIGHTS_NAME, job["max_bytes"], "adapter_model.safetensors")
    config_data = _read(directory / CONFIG_NAME, MAX_CONFIG_BYTES, "adapter_config.json")
    check_safetensors_header(weights_data)
    tensors = _load_tensors(weights_data)
    del weights_data
    hf = parse_config(config_data)
    if job.get("structure_only"):
        return _structure_only(
            hf, tensors, base_model=job.get("base_model") or "", directory=directory
        )
    models = job.get("models") or {}
    base_model = _base_model(hf, chosen=job.get("base_model") or "", models=models)
    return _check_against_model(
        hf,
        tensors,
        base_model=base_model,
        registered=models.get(base_model),
        cache_dir=job["cache_dir"],
        directory=directory,
    )


def _read(path: Path, limit: int, label: str) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise AdapterError(f"{label} is larger than {limit:,} bytes")
    return path.read_bytes()


# ---- the safetensors container, checked before any parser sees it ---------------------------


def check_safetensors_header(data: bytes) -> dict:
    """The JSON header of a safetensors file, every entry's bounds checked; AdapterError else."""
    if len(data) < 8:
        raise AdapterError(f"{NOT_SAFETENSORS} (shorter than its 8-byte header length)")
    length = int.from_bytes(data[:8], "little")
    if not 2 <= length <= min(MAX_HEADER_BYTES, len(data) - 8):
        raise AdapterError(
            f"{NOT_SAFETENSORS} (its header length {length:,} does not fit a "
            f"{len(data):,}-byte file)"
        )
    raw = data[8 : 8 + length]
    if not raw.startswith(b"{"):
        raise AdapterError(f"{NOT_SAFETENSORS} (the header is not a JSON object)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AdapterError(f"{NOT_SAFETENSORS} (the header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{NOT_SAFETENSORS} (the header is not a JSON object)")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if not entries:
        raise AdapterError("adapter_model.safetensors holds no tensors")
    if len(entries) > MAX_TENSORS:
        raise AdapterError(f"adapter_model.safetensors holds more than {MAX_TENSORS:,} tensors")
    body = len(data) - 8 - length
    for name, info in entries.items():
        _check_entry(name, info, body)
    return header


def _check_entry(name: str, info, body: int) -> None:
    if len(name) > MAX_NAME_CHARS:
        raise AdapterError(f"a tensor name is longer than {MAX_NAME_CHARS} characters")
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise AdapterError(f"{NOT_SAFETENSORS} (tensor {name!r} is described wrongly)")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BYTES:
        allowed = ", ".join(DTYPE_BYTES)
        raise AdapterError(f"tensor {name!r} has dtype {dtype!r}; adapters hold {allowed}")
    if not _int_list(shape, MAX_DIMS) or not _int_list(offsets, 2) or len(offsets) != 2:
        raise AdapterError(f"{NOT_SAFETENSORS} (tensor {name!r} has a bad shape or offsets)")
    start, end = offsets
    if not start <= end <= body or end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise AdapterError(f"{NOT_SAFETENSORS} (tensor {name!r} lies outside the file)")


def _int_list(value, max_len: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= max_len
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def _load_tensors(data: bytes) -> dict:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except SafetensorError as exc:
        raise AdapterError(f"{NOT_SAFETENSORS} ({exc})") from None
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"tensor {name!r} holds NaN or infinite values")
    return tensors


# ---- adapter_config.json -------------------------------------------------------------------


def parse_config(data: bytes) -> dict:
    try:
        hf = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AdapterError("adapter_config.json is not valid JSON") from None
    if not isinstance(hf, dict):
        raise AdapterError("adapter_config.json does not hold a JSON object")
    if _depth(hf) > MAX_CONFIG_DEPTH:
        raise AdapterError(f"adapter_config.json is nested deeper than {MAX_CONFIG_DEPTH} levels")
    return hf


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _base_model(hf: dict, *, chosen: str, models: dict) -> str:
    """The adapter's base: the one chosen, else the one its config names, as a registered
    model's name, Hub id or directory (what PEFT Lab's downloads write), or a catalogue key
    or a bundled model's Hub twin."""
    from peft_core.catalogue import CATALOGUE, key_for_name

    named = chosen or hf.get("base_model_name_or_path")
    if not isinstance(named, str):
        named = None
    registered = next(
        (name for name, entry in models.items() if named in (name, *entry["aliases"])), None
    )
    key = registered or (key_for_name(named) if named else None)
    if key is None:
        known = ", ".join([*CATALOGUE, *models])
        raise AdapterError(f"base model {named!r} is not registered here; pick one of {known}")
    return key


def _structure_only(hf: dict, tensors: dict, *, base_model: str, directory: Path) -> dict:
    """An adapter for a base PEFT Lab does not hold (a run trained elsewhere on a model nobody
    registered here): its safetensors are parsed and written again, its config is read, but
    its shapes cannot be held against the base's. What it claims is kept, bounded."""
    from safetensors.torch import save_file

    peft_type = hf.get("peft_type")
    if not isinstance(peft_type, str) or not 1 <= len(peft_type) <= 60:
        raise AdapterError('adapter_config.json names no peft_type (e.g. "LORA")')
    task_type = hf.get("task_type")
    task = TASK_TYPES.get(task_type) if isinstance(task_type, str | None) else None
    save_file(tensors, directory / VALIDATED_NAME, metadata={"format": "pt"})
    return {
        "method": peft_type.lower(),
        "method_name": peft_type,
        "method_config": {},
        "base_model": base_model,
        "task": task or "causal-lm",
        "num_labels": _num_labels(tensors) if task == "seq-cls" else 2,
        "config": hf,
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
    }


# ---- against the base model's architecture -------------------------------------------------


def _check_against_model(
    hf: dict,
    tensors: dict,
    *,
    base_model: str,
    registered: dict | None,
    cache_dir: str,
    directory: Path,
) -> dict:
    from safetensors.torch import save_file

    from peft_core import model as peft_model
    from peft_core.catalogue import get_spec, upstream_name
    from peft_core.registry import METHOD_CONFIGS

    tasks = tuple(registered["tasks"]) if registered else get_spec(base_model).tasks
    task = _task(hf, tasks)
    try:
        method = peft_model.method_for_hf_config(hf)
    except ValueError as exc:
        raise AdapterError(str(exc)) from None
    num_labels = _num_labels(tensors) if task == "seq-cls" else 2
    try:
        model_dir = Path(registered["dir"]) if registered else None
        model = _meta_model(base_model, task, num_labels, cache_dir, model_dir)
        config = peft_model._config_from_hf(model, hf)
        peft_model.apply(model, config)
        peft_model.load_adapter_tensors(model, tensors, source="adapter_model.safetensors")
        upstream = registered["upstream"] if registered else upstream_name(base_model)
        revision = registered.get("revision") if registered else None
        rebuilt = peft_model.hf_config(model, upstream, revision)
    except MemoryError:
        raise
    except Exception as exc:  # a config field of the wrong type fails deep inside; say what
        raise AdapterError(f"the adapter does not fit {base_model}: {exc}") from None
    save_file(tensors, directory / VALIDATED_NAME, metadata={"format": "pt"})
    name = next(n for n, cls in METHOD_CONFIGS.items() if type(config) is cls)
    return {
        "method": name,
        "method_name": method.name,
        "method_config": _changed_fields(config),
        "base_model": base_model,
        "task": task,
        "num_labels": num_labels,
        "config": rebuilt,
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
    }


def _task(hf: dict, tasks: tuple[str, ...]) -> str:
    task_type = hf.get("task_type")
    if not isinstance(task_type, str | None) or task_type not in TASK_TYPES:
        known = ", ".join(k for k in TASK_TYPES if k)
        raise AdapterError(f"task_type {task_type!r} is not supported (supported: {known})")
    task = TASK_TYPES[task_type]
    if task not in tasks:
        raise AdapterError(f"the base model supports {', '.join(tasks)}, not {task}")
    return task


def _num_labels(tensors: dict) -> int:
    """A classifier adapter saves its head: its output rows are the labels."""
    heads = [t for k, t in tensors.items() if k.endswith(("classifier.weight", "score.weight"))]
    if not heads or heads[0].dim() != 2 or not 2 <= heads[0].shape[0] <= 10_000:
        raise AdapterError("a SEQ_CLS adapter must hold its classification head's weight")
    return int(heads[0].shape[0])


def _meta_model(
    base_model: str, task: str, num_labels: int, cache_dir: str, registered_dir: Path | None
):
    """The base model's architecture with meta tensors: every shape, no memory, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from peft_core.catalogue import model_dir, quiet_transformers

    directory = registered_dir or model_dir(base_model, cache_dir=cache_dir)
    with quiet_transformers():
        config = AutoConfig.from_pretrained(
            directory, local_files_only=True, trust_remote_code=False
        )
    if task == "seq-cls":
        config.num_labels = num_labels
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"), quiet_transformers():
        return auto.from_config(config, dtype=torch.float32)


def _changed_fields(config) -> dict:
    """The config's fields that differ from the method's defaults, as JSON values."""
    import dataclasses

    defaults = type(config)()
    return {
        field.name: _json_value(getattr(config, field.name))
        for field in dataclasses.fields(config)
        if getattr(config, field.name) != getattr(defaults, field.name)
    }


def _json_value(value):
    return list(value) if isinstance(value, tuple) else value


if __name__ == "__main__":
    sys.exit(main())
