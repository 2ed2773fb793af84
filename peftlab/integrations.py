"""A transformers Trainer, or TRL's SFTTrainer, tracked as a PEFT Lab run.

    from peftlab.integrations import PeftLabCallback

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[PeftLabCallback(project="Default", name="my-lora")])
    trainer.train()   # the run: succeeded when train() returns, failed if it raises

Each train() is one run (peftlab.init), logged by the main process only:
- curves: the Trainer's `loss` as `train_loss`, `eval_loss` and the other `eval_*` metrics,
  `learning_rate`, `grad_norm`, `epoch`, and `tokens` where the Trainer counts them
  (`num_input_tokens_seen`, TRL's `num_tokens`), at the Trainer's global step; its closing
  figures (train_runtime, …, the mean train loss as `train_loss_mean`) go to the summary;
- configuration: the TrainingArguments (`to_sanitized_dict`, plus `steps`: the steps this
  train() will run) as the train config, the adapter's config as the method config: HF PEFT's
  `peft_config`, or peft_core's; the method is PEFT Lab's name for it (lora, dora, ia3,
  prompt, prefix, …; HF PEFT's peft_type in lower case for others; "full" without one);
- the base model: `config._name_or_path`, with `@<commit>` when transformers knows the
  revision (`_commit_hash`); its trainable and total parameters as the run's profile;
- at the end, the adapter (save_pretrained into a temporary directory) as the run's adapter
  (the server checks it, against the base model when it has that model), or as two plain
  files of the run should the server refuse it as an adapter.

The server and token come from the arguments, PEFTLAB_URL / PEFTLAB_TOKEN, or
`peftlab login`. On an exception train() does not reach on_train_end: the run is finished
as failed at exit (peftlab.tracking's hooks).
"""

import dataclasses
import enum
import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from peftlab import tracking
from peftlab.client import ADAPTER_FILES, ApiError, ClientError

logger = logging.getLogger("peftlab")

RENAMED = {"loss": "train_loss", "num_input_tokens_seen": "tokens", "num_tokens": "tokens"}
# Only the Trainer's last log of a train() has total_flos: its figures go to the run's
# summary, not its curves (train_runtime alone also comes with every log that counts tokens).
CLOSING = "total_flos"
CLOSING_RENAMED = {"train_loss": "train_loss_mean"}
NOT_A_KEY = re.compile(r"[^A-Za-z0-9_./-]")
MAX_NAME = 200  # the server's longest base model name


class PeftLabCallback(TrainerCallback):
    """Track each train() of the Trainer it is given to as a PEFT Lab run (see the module)."""

    def __init__(
        self,
        project: int | str | None = None,
        name: str | None = None,
        *,
        tags: list[str] | tuple[str, ...] | None = None,
        base_model: str | None = None,
        upload_adapter: bool = True,
        url: str | None = None,
        token: str | None = None,
    ) -> None:
        self.project = project
        self.name = name
        self.tags = list(tags or [])
        self.base_model = base_model  # default: the model's own name (and revision)
        self.upload_adapter = upload_adapter
        self.url = url
        self.token = token
        self.run: tracking.Run | None = None  # the last train()'s

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.run is not None and not self.run.finished:  # an earlier train() raised
            self.run.finish("failed")
        method, method_config = describe_adapter(model)
        self.run = tracking.init(
            project=self.project,
            name=self.name,
            config={**args.to_sanitized_dict(), "steps": state.max_steps},
            tags=self.tags,
            base_model=self.base_model or base_model_name(model),
            method=method,
            method_config=method_config,
            profile=parameter_counts(model),
            url=self.url,
            token=self.token,
        )
        self.run._exit_status = "failed"  # at exit before on_train_end: train() raised

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run is None or self.run.finished or not state.is_world_process_zero or not logs:
            return  # logs after train() (a later evaluate()) have no run to go to
        numbers = {key: value for key, value in logs.items() if _is_number(value)}
        if CLOSING in numbers:
            for key, value in numbers.items():
                if key != "epoch":
                    self.run.summary[_key(CLOSING_RENAMED.get(key, key))] = value
            return
        self.run.log(
            {_key(RENAMED.get(k, k)): v for k, v in numbers.items()}, step=state.global_step
        )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.run is None or self.run.finished or not state.is_world_process_zero:
            return
        if self.upload_adapter and model is not None:
            try:
                self._upload_adapter(model)
            except (ClientError, OSError, ValueError) as error:  # the run itself went well
                logger.warning("peftlab: the adapter was not uploaded: %s", error)
        self.run.finish("succeeded")

    def _upload_adapter(self, model) -> None:
        with tempfile.TemporaryDirectory(prefix="peftlab-adapter-") as directory:
            if not save_adapter(model, directory):
                return
            try:
                self.run.log_artifact(directory, kind="adapter")
            except ApiError as error:
                if error.status != 400:
                    raise
                logger.warning("peftlab: %s; the adapter is kept as two plain files", error)
                paths = [Path(directory) / name for name in ADAPTER_FILES]
                self.run.profile["adapter_bytes"] = sum(path.stat().st_size for path in paths)
                for path in paths:
                    self.run.log_artifact(path, kind="file")


# --- what the model says about itself ------------------------------------------


def describe_adapter(model) -> tuple[str, dict]:
    """(method name, method config) of HF PEFT's or peft_core's adapter; ("full", {}) without."""
    peft_configs = getattr(model, "peft_config", None)  # HF PEFT: {adapter name: config}
    if isinstance(peft_configs, dict) and peft_configs:
        active = getattr(model, "active_adapter", None)
        active = active[0] if isinstance(active, list | tuple) and active else active
        config = peft_configs.get(active) or next(iter(peft_configs.values()))
        hf = plain(config.to_dict())
        return _hf_method(hf), hf
    ours = getattr(model, "peft_core_config", None)
    if ours is not None:
        from peft_core.methods import METHOD_LIST

        key = next(e.key for e in METHOD_LIST if type(ours) is e.config_cls)
        return key, plain(dataclasses.asdict(ours))
    return "full", {}


def _hf_method(hf: dict) -> str:
    """PEFT Lab's key for an HF PEFT config (LORA → lora, LORA + use_dora → dora, …)."""
    from peft_core.methods import METHOD_LIST
    from peft_core.model import method_for_hf_config

    try:
        method = method_for_hf_config(hf)
    except ValueError:  # a method PEFT Lab does not implement: HF PEFT's own name
        return str(hf.get("peft_type") or "peft").lower()
    return next(e.key for e in METHOD_LIST if e.config_cls is method.config_cls)


def base_model_name(model) -> str:
    """The name transformers loaded the model by, @ its Hub commit when known; the model
    type for one built from a config."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or ""
    if not name:
        name = getattr(config, "model_type", "") or type(model).__name__
    revision = getattr(config, "_commit_hash", None)
    return (f"{name}@{revision}" if revision else name)[:MAX_NAME]


def parameter_counts(model) -> dict | None:
    if model is None:
        return None
    params = list(model.parameters())
    return {
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
    }


def save_adapter(model, directory: str) -> bool:
    """Write adapter_config.json + adapter_model.safetensors; False for a model without an
    adapter (full fine-tuning: its weights are the user's to keep)."""
    if isinstance(getattr(model, "peft_config", None), dict):
        model.save_pretrained(directory, safe_serialization=True)
    elif getattr(model, "peft_core_config", None) is not None:
        import peft_core

        peft_core.save_adapter(model, directory)
    else:
        return False
    missing = [name for name in ADAPTER_FILES if not (Path(directory) / name).is_file()]
    if missing:
        raise ValueError(f"save_pretrained wrote no {', '.join(missing)}")
    return True


def plain(value: Any) -> Any:
    """JSON values from a config's to_dict(): sets as sorted lists, enums as their values,
    anything else unknown as its str()."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if isinstance(value, set | frozenset):
        return sorted((plain(item) for item in value), key=str)
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _key(name: str) -> str:
    """A Trainer's metric name as a PEFT Lab key (1-64 of A-Z a-z 0-9 _ . / -)."""
    return NOT_A_KEY.sub("_", name)[:64] or "_"
