"""PEFT Lab's Python client, command line (`peftlab`) and tracking SDK.

    import peftlab

    run = peftlab.init(project="Default", name="my-lora", config={"learning_rate": 2e-4},
                       base_model="gpt2", method="lora")
    run.log({"train_loss": 0.5})
    run.finish()

`peftlab.integrations.PeftLabCallback` does the same for a transformers Trainer. The names
load on first use, so the CLI's remote commands start without them.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {name: "peftlab.tracking" for name in ("Run", "init", "log", "finish", "current_run")}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name == "run":  # like wandb.run: the current run, or None
        return import_module("peftlab.tracking").current_run()
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, "run"})
