"""Training checkpoints: everything needed to continue a run bit for bit.

A resumed run must take the same steps as the uninterrupted one, so a checkpoint holds
more than the adapter: the trainable parameters θ, AdamW's moments (m, v) and step
count t per parameter, the param-group hyper-parameters, the LR schedule's position,
the torch RNG states (dropout draws from them) and the loop's counters. The data order
needs nothing: the batch stream is a function of (seed, step), see `data.train_batches`.

On disk (and in object storage) a checkpoint is exactly two files:

    checkpoint.safetensors  every tensor, keys "param/<name>", "adam/<key>/<name>",
                            "rng/cpu", "rng/cuda/<i>"
    checkpoint.json         step, names, hyper-parameters, scalar state, the format
                            version and the sha256 of checkpoint.safetensors

Neither format can run code, so a checkpoint from an untrusted place is only data;
`checkpoint_from_files` checks both files against each other before anything uses them.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from peft_core.checks import is_int, is_number

FORMAT = "peft-lab-checkpoint"
VERSION = 1
TENSORS_FILE = "checkpoint.safetensors"
META_FILE = "checkpoint.json"
FILES = (TENSORS_FILE, META_FILE)
ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # max_…: amsgrad only
SCHEDULER_KEYS = ("last_epoch", "_step_count", "base_lrs", "_last_lr")


class CheckpointError(ValueError):
    """A checkpoint is damaged, or belongs to another model or training config."""


@dataclass(frozen=True)
class Checkpoint:
    step: int  # steps done; a resumed run goes on at step + 1
    config_digest: str  # TrainConfig.trajectory_digest() of the run that wrote it
    params: dict[str, torch.Tensor]  # trainable parameters by name
    optimizer_state: dict[str, dict[str, torch.Tensor]]  # name -> ADAM_KEYS subset
    param_groups: list[dict[str, Any]]  # AdamW hyper-parameters, without "params"
    scheduler_state: dict[str, Any]  # SCHEDULER_KEYS
    cpu_rng_state: torch.Tensor  # torch.get_rng_state(): uint8 (5056,)
    cuda_rng_states: list[torch.Tensor] = field(default_factory=list)  # one per device
    tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # the loop's last metrics
    nonfinite_streak: int = 0  # non-finite steps in a row just before `step`


# ---------------------------------------------------------------- capture / restore


def capture_checkpoint(
    step: int,
    *,
    named_params: Mapping[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config_digest: str,
    tokens: int,
    metrics: Mapping[str, float],
    nonfinite_streak: int = 0,
) -> Checkpoint:
    """A CPU copy of the run's state; `named_params` in the optimizer's parameter order."""
    names = list(named_params)
    optimizer_dict = optimizer.state_dict()
    return Checkpoint(
        step=step,
        config_digest=config_digest,
        params={name: _cpu_copy(param) for name, param in named_params.items()},
        optimizer_state={  # the optimizer keeps no state for a parameter that never had a grad
            names[index]: {key: _cpu_copy(value) for key, value in state.items()}
            for index, state in optimizer_dict["state"].items()
        },
        param_groups=[
            {key: _plain(value) for key, value in group.items() if key != "params"}
            for group in optimizer_dict["param_groups"]
        ],
        scheduler_state={key: _plain(scheduler.state_dict()[key]) for key in SCHEDULER_KEYS},
        cpu_rng_state=torch.get_rng_state(),
        cuda_rng_states=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        tokens=tokens,
        metrics=dict(metrics),
        nonfinite_streak=nonfinite_streak,
    )


def restore_checkpoint(
    checkpoint: Checkpoint,
    *,
    named_params: Mapping[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Put parameters, optimizer, schedule and RNG back as they were at checkpoint.step."""
    _check_params_match(checkpoint.params, named_params)
    with torch.no_grad():
        for name, param in named_params.items():
            param.copy_(checkpoint.params[name])
    optimizer.load_state_dict(_optimizer_dict(checkpoint, list(named_params), optimizer))
    scheduler_dict = scheduler.state_dict()
    scheduler_dict.update(checkpoint.scheduler_state)
    if "lr_lambdas" in scheduler_dict:  # the lambda itself is code: ours stays in place
        scheduler_dict["lr_lambdas"] = [None] * len(scheduler_dict["lr_lambdas"])
    scheduler.load_state_dict(scheduler_dict)
    torch.set_rng_state(checkpoint.cpu_rng_state)
    if torch.cuda.is_available():
        for device, state in enumerate(checkpoint.cuda_rng_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


def _check_params_match(
    saved: Mapping[str, torch.Tensor], live: Mapping[str, nn.Parameter]
) -> None:
    missing, extra = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or extra:
        raise CheckpointError(
            "the checkpoint is for other trainable parameters: "
            f"missing {_few(missing)}, unexpected {_few(extra)}"
        )
    for name, param in live.items():
        tensor = saved[name]
        if tensor.shape != param.shape or tensor.dtype != param.dtype:
            raise CheckpointError(
                f"parameter {name} is {tuple(tensor.shape)} {tensor.dtype} in the checkpoint "
                f"but {tuple(param.shape)} {param.dtype} in the model"
            )


def _optimizer_dict(
    checkpoint: Checkpoint, names: list[str], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The checkpoint as `optimizer.state_dict()` looks, indexed like the live parameters.

    Tensors are cloned: load_state_dict keeps them as they are when dtype and device
    already match, and the optimizer then updates them in place, which would change
    the checkpoint under the caller's feet.
    """
    live_groups = optimizer.state_dict()["param_groups"]
    if len(live_groups) != len(checkpoint.param_groups):
        raise CheckpointError("the checkpoint has a different number of optimizer param groups")
    groups = []
    for live, saved in zip(live_groups, checkpoint.param_groups, strict=True):
        unknown = sorted(set(saved) - set(live))
        if unknown:
            raise CheckpointError(f"unknown optimizer hyper-parameters {unknown}")
        groups.append({**live, **saved, "betas": tuple(saved.get("betas", live["betas"]))})
    state = {
        index: {key: value.clone() for key, value in checkpoint.optimizer_state[name].items()}
        for index, name in enumerate(names)
        if name in checkpoint.optimizer_state
    }
    return {"state": state, "param_groups": groups}


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def _plain(value: Any) -> Any:
    """JSON's view of a hyper-parameter: tuples become lists."""
    return list(value) if isinstance(value, tuple) else value


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit]) or "none"
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# ---------------------------------------------------------------- files


def checkpoint_to_files(checkpoint: Checkpoint) -> dict[str, bytes]:
    """{"checkpoint.safetensors": …, "checkpoint.json": …}: the checkpoint as two files."""
    tensors_bytes = save_tensors(_tensors_of(checkpoint))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "step": checkpoint.step,
        "config_digest": checkpoint.config_digest,
        "tensors_sha256": hashlib.sha256(tensors_bytes).hexdigest(),
        "params": list(checkpoint.params),
        "optimizer_state": {name: list(s) for name, s in checkpoint.optimizer_state.items()},
        "param_groups": checkpoint.param_groups,
        "scheduler_state": checkpoint.scheduler_state,
        "cuda_rng_devices": len(checkpoint.cuda_rng_states),
        "tokens": checkpoint.tokens,
        "metrics": checkpoint.metrics,
        "nonfinite_streak": checkpoint.nonfinite_streak,
    }
    try:
        meta_bytes = json.dumps(meta, indent=1, allow_nan=False).encode()
    except ValueError as error:  # NaN / inf have no JSON spelling
        raise CheckpointError(f"the checkpoint's scalar state is not plain JSON: {error}") from None
    return {TENSORS_FILE: tensors_bytes, META_FILE: meta_bytes}


def _tensors_of(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    tensors = {f"param/{name}": tensor for name, tensor in checkpoint.params.items()}
    for name, state in checkpoint.optimizer_state.items():
        tensors.update({f"adam/{key}/{name}": tensor for key, tensor in state.items()})
    tensors["rng/cpu"] = checkpoint.cpu_rng_state
    for device, state in enumerate(checkpoint.cuda_rng_states):
        tensors[f"rng/cuda/{device}"] = state
    return {key: _cpu_copy(tensor) for key, tensor in tensors.items()}


def checkpoint_from_files(files: Mapping[str, bytes]) -> Checkpoint:
    """Parse and check the two files; any inconsistency is a CheckpointError."""
    missing, extra = [n for n in FILES if n not in files], sorted(set(files) - set(FILES))
    if missing or extra:
        raise CheckpointError(f"a checkpoint is exactly {FILES}; missing {missing}, extra {extra}")
    meta = _parse_meta(files[META_FILE])
    if hashlib.sha256(files[TENSORS_FILE]).hexdigest() != meta["tensors_sha256"]:
        raise CheckpointError(f"{TENSORS_FILE} does not match the sha256 in {META_FILE}")
    try:
        tensors = load_tensors(files[TENSORS_FILE])
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{TENSORS_FILE} is not a safetensors file: {error}") from None
    _check_tensor_names(tensors, _expected_tensor_names(meta))
    checkpoint = Checkpoint(
        step=meta["step"],
        config_digest=meta["config_digest"],
        params={name: tensors[f"param/{name}"] for name in meta["params"]},
        optimizer_state={
            name: {key: tensors[f"adam/{key}/{name}"] for key in keys}
            for name, keys in meta["optimizer_state"].items()
        },
        param_groups=meta["param_groups"],
        scheduler_state=meta["scheduler_state"],
        cpu_rng_state=tensors["rng/cpu"],
        cuda_rng_states=[tensors[f"rng/cuda/{i}"] for i in range(meta["cuda_rng_devices"])],
        tokens=meta["tokens"],
        metrics=meta["metrics"],
        nonfinite_streak=meta["nonfinite_streak"],
    )
    _check_tensor_shapes(checkpoint)
    return checkpoint


def _parse_meta(raw: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(raw.decode(), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{META_FILE} is not JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{META_FILE} is not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint format version {meta.get('version')!r} is not supported "
            f"(this version reads {VERSION})"
        )
    problems = [key for key, valid in _META_CHECKS.items() if not valid(meta.get(key))]
    if problems:
        raise CheckpointError(f"{META_FILE} has missing or invalid fields: {problems}")
    return meta


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not plain JSON")


def _is_count(value: Any) -> bool:
    return is_int(value) and value >= 0


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= set("0123456789abcdef")


def _is_names(value: Any) -> bool:
    """A list of distinct non-empty strings."""
    if not isinstance(value, list) or len(set(map(str, value))) != len(value):
        return False
    return all(isinstance(name, str) and name for name in value)


def _is_hyper(value: Any) -> bool:
    """A param-group value: None, a bool, a number or a list of numbers (betas)."""
    if isinstance(value, list):
        return all(map(is_number, value))
    return value is None or isinstance(value, bool) or is_number(value)


def _is_optimizer_state(value: Any) -> bool:
    """{param name: [state keys]}."""
    return isinstance(value, dict) and all(
        _is_names(keys) and set(keys) <= set(ADAM_KEYS) for keys in value.values()
    )


def _is_param_groups(value: Any) -> bool:
    if not isinstance(value, list) or not all(isinstance(group, dict) for group in value):
        return False
    return all(is_number(g.get("lr")) and all(map(_is_hyper, g.values())) for g in value)


def _is_scheduler_state(value: Any) -> bool:
    if not isinstance(value, dict) or set(value) != set(SCHEDULER_KEYS):
        return False
    counters, rates = SCHEDULER_KEYS[:2], SCHEDULER_KEYS[2:]
    return all(isinstance(value[key], int) for key in counters) and all(
        isinstance(value[key], list) and all(map(is_number, value[key])) for key in rates
    )


def _is_metrics(value: Any) -> bool:
    return isinstance(value, dict) and all(map(is_number, value.values()))


_META_CHECKS = {
    "step": _is_count,
    "config_digest": _is_sha256,
    "tensors_sha256": _is_sha256,
    "params": lambda value: _is_names(value) and bool(value),
    "optimizer_state": _is_optimizer_state,
    "param_groups": _is_param_groups,
    "scheduler_state": _is_scheduler_state,
    "cuda_rng_devices": _is_count,
    "tokens": _is_count,
    "metrics": _is_metrics,
    "nonfinite_streak": _is_count,
}


def _expected_tensor_names(meta: dict[str, Any]) -> set[str]:
    if not set(meta["optimizer_state"]) <= set(meta["params"]):
        raise CheckpointError("optimizer state names parameters the checkpoint does not hold")
    names = {f"param/{name}" for name in meta["params"]}
    for name, keys in meta["optimizer_state"].items():
        names.update(f"adam/{key}/{name}" for key in keys)
    names.add("rng/cpu")
    names.update(f"rng/cuda/{device}" for device in range(meta["cuda_rng_devices"]))
    return names


def _check_tensor_names(tensors: Mapping[str, torch.Tensor], expected: set[str]) -> None:
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise CheckpointError(
            f"{TENSORS_FILE} does not hold the tensors {META_FILE} lists: "
            f"missing {_few(missing)}, unexpected {_few(extra)}"
        )


def _check_tensor_shapes(checkpoint: Checkpoint) -> None:
    """Shapes and dtypes the restore relies on; a mismatch means a forged or mixed file."""
    cpu_rng = torch.get_rng_state()
    rng_states = [checkpoint.cpu_rng_state, *checkpoint.cuda_rng_states]
    if any(state.dtype != torch.uint8 or state.dim() != 1 for state in rng_states):
        raise CheckpointError("an RNG state is not a 1-D uint8 tensor")
    if checkpoint.cpu_rng_state.shape != cpu_rng.shape:
        raise CheckpointError(f"the CPU RNG state has shape {tuple(cpu_rng.shape)} in torch")
    for name, param in checkpoint.params.items():
        if not param.is_floating_point():
            raise CheckpointError(f"parameter {name} is not a floating-point tensor")
        for key, value in checkpoint.optimizer_state.get(name, {}).items():
            expected = () if key == "step" else param.shape
            if value.shape != expected or not value.is_floating_point():
                raise CheckpointError(f"optimizer {key} of {name} has the wrong shape or dtype")


def write_checkpoint(directory: str | os.PathLike, checkpoint: Checkpoint) -> Path:
    """Write the two files into `directory`, each atomically (temp file, then os.replace).

    The json goes last: a reader that sees a new json sees the safetensors it hashes, and
    a crash in between leaves a pair whose sha256 disagrees, which reading refuses.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in checkpoint_to_files(checkpoint).items():
        _write_atomically(directory / name, content)
    return directory


def _write_atomically(path: Path, content: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        try:
            tmp.write(content)
            tmp.flush()
            os.fsync(tmp.fileno())
        except BaseException:
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)


def read_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """The checkpoint `write_checkpoint` wrote to `directory`, checked."""
    directory = Path(directory)
    files = {name: (directory / name).read_bytes() for name in FILES if (directory / name).exists()}
    return checkpoint_from_files(files)
