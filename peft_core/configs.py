"""Every method's config, and the training config: torch-free dataclasses, the one judge.

Each field declares its default, bounds, label and help once (`checks.setting`), and
`__post_init__` enforces exactly those bounds, then the rules that tie fields together.
The web builds its forms from the same metadata and asks the same config
(`registry.build_config`) before anything is queued, so the web never imports torch to
judge a value, and the CLI, a form and the API share one default.

Two class attributes say what a method is, for code that must not import torch:
`title` ("LoRA", shown in messages and on forms) and `mergeable` (whether
`peft_core.merge` can fold the adapter into the base weights).
The method files (`lora.py`, …) re-export their config, so `from peft_core.lora import
LoraConfig` keeps working; the math lives there.
"""

import hashlib
import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from peft_core.checks import ConfigError, check_settings, is_int, names_tuple, reuse, setting
from peft_core.task_metrics import EVAL_METRICS, METRICS_BY_TASK

ALL_LINEAR = "all-linear"
TargetSpec = tuple[str, ...] | str | None  # targets.py's module docstring says what each means

MAX_RANK = 1024
MAX_ALPHA = 10_000.0
MAX_VIRTUAL_TOKENS = 1024
MAX_PROJECTION_DIM = 65_536
MAX_INIT_TEXT_CHARS = 1000
MAX_DIM = 65_536
MAX_SCALING = 100.0
DEFAULT_REDUCTION_FACTOR = 16
MAX_STEPS = 1_000_000
MAX_LEARNING_RATE = 1.0

INIT_CHOICES = (
    ("random", "Random"),
    ("vocab", "Embeddings of random vocabulary tokens"),
    ("text", "Embeddings of a text you give"),
)
PLACEMENT_CHOICES = (
    ("houlsby", "Houlsby — after attention and after the FFN"),
    ("pfeiffer", "Pfeiffer — after the FFN only"),
    ("parallel", "Parallel — beside the FFN, scaled"),
)
ACTIVATION_CHOICES = (("relu", "ReLU"), ("gelu", "GELU"), ("silu", "SiLU"), ("tanh", "tanh"))
INITS = tuple(value for value, _ in INIT_CHOICES)
PLACEMENTS = tuple(value for value, _ in PLACEMENT_CHOICES)


def modules_to_save() -> Any:
    return setting(
        (),
        "Modules to save",
        "Modules trained in full beside the adapter and saved with it (a classification "
        "head is added by itself).",
    )


def refuse_quantized(method: str, quantize: str) -> None:
    """A method that cannot train on a quantised base is refused, saying why. The bottleneck
    and MAM adapters are refused: nothing checks them on a bitsandbytes base. (DoRA trains on
    one: its norm dequantises W0 each step, as HF PEFT does; tests/peft_core/
    test_dora_quantized.py holds it to HF PEFT on NF4 and int8.)"""
    if quantize != "none" and method == "full":
        raise ConfigError(
            "quantize",
            f"full fine-tuning cannot train a {quantize} base: its weights are packed "
            "integers, which no gradient step can update. Use quantize none, or an adapter "
            f"method ({', '.join(QUANTIZABLE_METHODS)}) on the quantised base (QLoRA)",
        )
    if quantize != "none" and method not in QUANTIZABLE_METHODS:
        raise ConfigError(
            "quantize",
            f"{method} cannot train on a {quantize} base: PEFT Lab has not checked it on a "
            f"bitsandbytes base yet. Use quantize none, or one of {', '.join(QUANTIZABLE_METHODS)}",
        )


# The metric key of an evaluation's duration (peft_core.train), which the time left counts.
EVAL_SECONDS = "time/eval_s"

# The methods FSDP trains (TrainConfig.parallel = "fsdp"; peft_core.distributed.shard_base):
# each was trained on 2 ranks and matched 1 process (tests/peft_core/test_distributed.py).
FSDP_METHODS = ("lora", "dora", "ia3", "prompt", "prefix", "bottleneck", "mam")


def refuse_fsdp(parallel: str, *, method: str, quantize: str, devices: int) -> None:
    """FSDP (TrainConfig.parallel) is refused, saying why, where it cannot train the run."""
    if parallel != "fsdp":
        return
    if devices < 2:
        why = "fsdp splits the base over several devices: ask for 2 or more devices, or use ddp"
    elif quantize != "none":
        why = (
            f"fsdp cannot split a {quantize} base (bitsandbytes' packed weights): use ddp, or "
            "fsdp with quantize none"
        )
    elif method not in FSDP_METHODS:
        why = f"fsdp trains {', '.join(FSDP_METHODS)}; {method} trains with ddp"
    else:
        return
    raise ConfigError("parallel", why)


def refuse_packing(packing: bool, *, method: str | None = None, task: str | None = None) -> None:
    """Packing (TrainConfig.packing) is refused, saying why, for a task or a method whose
    examples cannot share a row; each caller passes what it knows. The model itself is
    judged when it is loaded (peft_core.packing)."""
    if not packing:
        return
    if task is not None and task != "causal-lm":
        raise ConfigError(
            "packing",
            f"packing is for causal LM training; a {task} example is one row with one label, "
            "so there is nothing to concatenate. Turn packing off",
        )
    if method in UNPACKABLE_METHODS:
        raise ConfigError(
            "packing",
            f"{method} cannot train packed: {UNPACKABLE_METHODS[method]}. Turn packing off, or "
            "use a method that adapts layers (lora, dora, ia3, bottleneck)",
        )


def target_spec(config: Any, name: str) -> TargetSpec:
    """A target field normalised: None and "all-linear" stay, a str must be a valid regex,
    a name or a list of names becomes a tuple."""
    spec = getattr(config, name)
    if spec is None or spec == ALL_LINEAR:
        return spec
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as err:
            message = f"{config.title} {name} {spec!r} is not a valid regex: {err}"
            raise ConfigError(name, message) from None
        return spec
    return names_tuple(spec, name)


def refuse_empty_targets(config: Any) -> None:
    if config.target_modules == ():
        raise ConfigError(
            "target_modules",
            f"{config.title} target_modules is empty; use None for the architecture default",
        )


# ---------------------------------------------------------------- LoRA, DoRA


@dataclass(frozen=True)
class LoraConfig:
    """LoRA's settings (lora.py has the math).

    dropout defaults to 0.05, not 0: the value HF PEFT's and TRL's LoRA examples and
    Axolotl's configs use, so people coming from them find the default they expect, and
    the CLI, the web form and the API all take this one default. The hand-written step
    (lora_steps.py) draws the mask itself, nn.Dropout's draw, so it stays on; what dropout
    still costs is one mask per adapted layer and step (docs/BENCHMARKS.md has the figures).
    HF PEFT's own default is 0 (an adapter_config.json without lora_dropout loads as 0).
    """

    title: ClassVar[str] = "LoRA"
    mergeable: ClassVar[bool] = True

    r: int = setting(
        8,
        "Rank r",
        "Width of the low-rank update B·A, its rank: higher r, more capacity and more "
        "parameters (r·(d_in + d_out) per adapted layer). 8 is a good start.",
        kind=int,
        low=1,
        high=MAX_RANK,
    )
    alpha: float = setting(
        16.0,
        "Alpha",
        "Strength of the update, which is scaled by alpha / r. 2·r is a common choice.",
        kind=float,
        low=0,
        low_open=True,
        high=MAX_ALPHA,
    )
    dropout: float = setting(
        0.05,
        "Dropout",
        "Dropout on the adapter's input while training, against overfitting (0 to disable, "
        "which makes each step a little faster: no masks to draw).",
        kind=float,
        low=0,
        high=1,
        high_open=True,
    )
    target_modules: TargetSpec = setting(
        None,
        "Adapted layers",
        'Which linear layers get an adapter: None for the architecture default, "all-linear", '
        "a regex of module paths or a list of module names.",
    )
    use_rslora: bool = setting(
        False,
        "rsLoRA scaling",
        "Scale by alpha / √r instead of alpha / r: keeps high ranks stable.",
        kind=bool,
    )
    modules_to_save: tuple[str, ...] = modules_to_save()

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__
        object.__setattr__(self, "target_modules", target_spec(self, "target_modules"))
        object.__setattr__(self, "modules_to_save", names_tuple(self.modules_to_save))
        refuse_empty_targets(self)
        check_settings(self)

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.use_rslora)


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """α/r, or α/√r with rank-stabilised LoRA (Kalajdzievski 2023, arXiv:2312.03732)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass(frozen=True)
class DoraConfig(LoraConfig):
    """LoRA's fields and checks; each adapted layer also learns a magnitude per output row."""

    title: ClassVar[str] = "DoRA"


# ---------------------------------------------------------------- (IA)³


@dataclass(frozen=True)
class IA3Config:
    title: ClassVar[str] = "(IA)³"
    mergeable: ClassVar[bool] = True

    target_modules: TargetSpec = setting(
        None,
        "Scaled layers",
        "Which layers get a learned scale: None for the architecture's (keys, values, "
        "feed-forward input), a regex of module paths or a list of module names.",
    )
    feedforward_modules: TargetSpec = setting(
        None,
        "Feed-forward layers",
        "Those of the scaled layers whose input, not output, is scaled: None for the "
        "architecture's, () for none.",
    )
    modules_to_save: tuple[str, ...] = modules_to_save()

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__
        object.__setattr__(self, "target_modules", target_spec(self, "target_modules"))
        object.__setattr__(self, "feedforward_modules", target_spec(self, "feedforward_modules"))
        object.__setattr__(self, "modules_to_save", names_tuple(self.modules_to_save))
        refuse_empty_targets(self)
        check_settings(self)
        self._check_feedforward()

    def _check_feedforward(self) -> None:
        targets, feedforward = self.target_modules, self.feedforward_modules
        if feedforward == ALL_LINEAR:
            raise ConfigError(
                "feedforward_modules",
                "(IA)³ feedforward_modules cannot be 'all-linear'; name the FFN layers",
            )
        if isinstance(targets, tuple) and isinstance(feedforward, tuple):
            if not set(feedforward) <= set(targets):  # HF PEFT's rule for two lists
                raise ConfigError(
                    "feedforward_modules",
                    f"(IA)³ feedforward_modules {list(feedforward)} must be a subset of "
                    f"target_modules {list(targets)}",
                )


# ---------------------------------------------------------------- prompt and prefix tuning


@dataclass(frozen=True)
class PromptTuningConfig:
    title: ClassVar[str] = "Prompt tuning"
    mergeable: ClassVar[bool] = False

    num_virtual_tokens: int = setting(
        20,
        "Virtual tokens p",
        "Prompt length: learned soft tokens placed before every input (p·d parameters). "
        "They use up part of the context; 10 to 100 is usual.",
        kind=int,
        low=1,
        high=MAX_VIRTUAL_TOKENS,
    )
    init: str = setting(
        "random",
        "Initialisation",
        "Starting from real token embeddings (or a task description) often trains faster "
        "than random vectors.",
        kind=str,
        choices=INIT_CHOICES,
    )
    init_text: str | None = setting(
        None,
        "Initial text",
        "For text initialisation, e.g. “Answer the instruction briefly:”.",
        kind=str,
        none_means="no text (random or vocabulary initialisation)",
        max_chars=MAX_INIT_TEXT_CHARS,
    )
    init_token_ids: tuple[int, ...] | None = setting(
        None,
        "Initial token ids",
        "The init text's token ids, which apply uses; tokenize_init_text fills them in.",
    )
    modules_to_save: tuple[str, ...] = modules_to_save()

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__
        object.__setattr__(self, "modules_to_save", names_tuple(self.modules_to_save))
        if self.init_token_ids is not None:
            object.__setattr__(self, "init_token_ids", _token_ids(self.init_token_ids))
        check_settings(self)
        has_text = self.init_text is not None or self.init_token_ids is not None
        if (self.init == "text") != has_text:
            raise ConfigError(
                "init_text",
                'init="text" needs an init_text (or init_token_ids), and only it takes one',
            )

    def tokenize_init_text(self, tokenizer: Any) -> "PromptTuningConfig":
        """This config with `init_token_ids` = the ids `tokenizer` gives init_text (HF PEFT's)."""
        if self.init_text is None:
            raise ValueError('tokenize_init_text needs init="text" and an init_text')
        return replace(self, init_token_ids=tuple(tokenizer(self.init_text)["input_ids"]))


def _token_ids(ids: Any) -> tuple[int, ...]:
    ids = tuple(ids)
    if not ids or not all(is_int(i) and i >= 0 for i in ids):
        message = f"init_token_ids must be non-negative integers, got {ids!r}"
        raise ConfigError("init_token_ids", message)
    return ids


@dataclass(frozen=True)
class PrefixTuningConfig:
    title: ClassVar[str] = "Prefix tuning"
    mergeable: ClassVar[bool] = False

    num_virtual_tokens: int = setting(
        20,
        "Virtual tokens p",
        "Prefix length: virtual key/value tokens that every attention layer attends to "
        "before the input (p·L·2·d_kv parameters saved). Longer: more capacity, less context.",
        kind=int,
        low=1,
        high=MAX_VIRTUAL_TOKENS,
    )
    projection_dim: int | None = setting(
        None,
        "Reparameterisation width h",
        "Train the prefix through an MLP of width h (steadier optimisation, as in the "
        "paper); only the projected prefix is saved.",
        kind=int,
        low=1,
        high=MAX_PROJECTION_DIM,
        none_means="train the prefix directly",
    )
    modules_to_save: tuple[str, ...] = modules_to_save()

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__
        object.__setattr__(self, "modules_to_save", names_tuple(self.modules_to_save))
        check_settings(self)


# ---------------------------------------------------------------- bottleneck adapters, MAM


@dataclass(frozen=True)
class BottleneckConfig:
    title: ClassVar[str] = "Bottleneck adapter"
    mergeable: ClassVar[bool] = False

    placement: str = setting(
        "houlsby",
        "Placement",
        "Where the adapters sit; Houlsby has two per layer, the others one.",
        kind=str,
        choices=PLACEMENT_CHOICES,
    )
    bottleneck_dim: int | None = setting(
        None,
        "Bottleneck width m",
        "The adapter projects the model width d down to m and back. Smaller m, fewer "
        "parameters (2·d·m + m + d per adapter). Set this or reduction_factor, not both.",
        kind=int,
        low=1,
        high=MAX_DIM,
        none_means=f"m = d // reduction_factor (d // {DEFAULT_REDUCTION_FACTOR} by default)",
    )
    reduction_factor: int | None = setting(
        None,
        "Reduction factor",
        "m = d // reduction_factor, so the width follows the model's.",
        kind=int,
        low=1,
        high=MAX_DIM,
        none_means=f"{DEFAULT_REDUCTION_FACTOR} unless bottleneck_dim is set",
    )
    activation: str = setting(
        "relu",
        "Activation",
        "Nonlinearity f between the adapter's down- and up-projection.",
        kind=str,
        choices=ACTIVATION_CHOICES,
    )
    scaling: float = setting(
        1.0,
        "Scaling s",
        "Parallel only: the adapter's output is multiplied by this (4 in the paper); a "
        "sequential adapter keeps 1.",
        kind=float,
        low=0,
        low_open=True,
        high=MAX_SCALING,
    )
    dropout: float = setting(
        0.0,
        "Dropout",
        "Dropout on the adapter's input while training (0 to disable).",
        kind=float,
        low=0,
        high=1,
        high_open=True,
    )
    modules_to_save: tuple[str, ...] = modules_to_save()

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__
        object.__setattr__(self, "modules_to_save", names_tuple(self.modules_to_save))
        if self.bottleneck_dim is None and self.reduction_factor is None:
            object.__setattr__(self, "reduction_factor", DEFAULT_REDUCTION_FACTOR)
        if self.bottleneck_dim is not None and self.reduction_factor is not None:
            raise ConfigError(
                "bottleneck_dim", "set exactly one of bottleneck_dim and reduction_factor, not both"
            )
        check_settings(self)
        if self.placement != "parallel" and self.scaling != 1.0:
            raise ConfigError(
                "scaling", f"scaling applies to parallel adapters only, not {self.placement!r}"
            )

    def width(self, d: int) -> int:
        """The bottleneck width m for a model width d."""
        return self.bottleneck_dim or max(1, d // self.reduction_factor)


@dataclass(frozen=True)
class MAMConfig:
    """Flat (one form, one JSON object per run); each half gets its own config below and
    keeps its own checks. Fields reuse the halves' bounds; p = 30 and s = 4 are the paper's."""

    title: ClassVar[str] = "MAM adapter"
    mergeable: ClassVar[bool] = False

    num_virtual_tokens: int = reuse(
        PrefixTuningConfig,
        "num_virtual_tokens",
        30,
        help="Prefix length of the attention half: virtual key/value tokens at every layer.",
    )
    projection_dim: int | None = reuse(PrefixTuningConfig, "projection_dim")
    bottleneck_dim: int | None = reuse(BottleneckConfig, "bottleneck_dim")
    reduction_factor: int | None = reuse(BottleneckConfig, "reduction_factor")
    scaling: float = reuse(
        BottleneckConfig,
        "scaling",
        4.0,
        help="Multiplies the parallel adapter's output (4 in the paper).",
    )
    activation: str = reuse(BottleneckConfig, "activation")
    dropout: float = reuse(BottleneckConfig, "dropout")
    modules_to_save: tuple[str, ...] = modules_to_save()

    def __post_init__(self) -> None:
        check_settings(self)
        # Each half validates its own fields too; keep what they normalised.
        adapter = self.adapter_config()
        object.__setattr__(self, "reduction_factor", adapter.reduction_factor)
        object.__setattr__(self, "modules_to_save", adapter.modules_to_save)
        self.prefix_config()

    def adapter_config(self) -> BottleneckConfig:
        """The parallel adapter half (the head in modules_to_save is the whole method's)."""
        return BottleneckConfig(
            placement="parallel",
            bottleneck_dim=self.bottleneck_dim,
            reduction_factor=self.reduction_factor,
            activation=self.activation,
            scaling=self.scaling,
            dropout=self.dropout,
            modules_to_save=self.modules_to_save,
        )

    def prefix_config(self) -> PrefixTuningConfig:
        return PrefixTuningConfig(
            num_virtual_tokens=self.num_virtual_tokens, projection_dim=self.projection_dim
        )


# ---------------------------------------------------------------- full fine-tuning


@dataclass(frozen=True)
class FullFineTuningConfig:
    """Every weight of the model trains: the reference the PEFT methods are measured against
    (quality, memory, time). Nothing is added to the model, so there is nothing to merge,
    switch off or attach: what it saves is the whole model (config.json + model.safetensors).
    AdamW keeps two moments per weight, so it needs about four times the model's weights in
    memory beside the activations; the pre-flight refuses a model that does not fit."""

    title: ClassVar[str] = "Full fine-tuning"
    mergeable: ClassVar[bool] = False
    whole_model: ClassVar[bool] = True  # saved whole, nothing to merge or switch off

    # Not a setting: every module trains and is saved already. Kept for the methods'
    # contract (peft_core.methods), and refused when given.
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules_to_save", names_tuple(self.modules_to_save))
        if self.modules_to_save:
            raise ConfigError(
                "modules_to_save",
                "full fine-tuning trains and saves every module already; leave "
                "modules_to_save empty",
            )
        check_settings(self)


# ---------------------------------------------------------------- training

# The fields that decide which updates a run makes: a checkpoint resumes only under these.
TRAJECTORY_FIELDS = (
    "steps", "batch_size", "learning_rate", "max_length", "warmup_steps", "grad_clip", "seed",
    "schedule", "grad_accum", "precision", "quantize", "packing",
)  # fmt: skip
QUANTIZE_CHOICES = (
    ("none", "None"),
    ("nf4", "NF4 (4-bit, QLoRA)"),
    ("int8", "int8 (LLM.int8)"),
)
# The methods that train on a bitsandbytes base: adapters beside its (frozen) linears.
QUANTIZABLE_METHODS = ("lora", "dora", "ia3", "prompt", "prefix")
# The methods that put something before a row's tokens, which a packed row's examples cannot
# each see (why, for the message).
_PREFIX_WHY = (
    "its keys and values reach each attention through a KV cache and a widened attention "
    "mask, and transformers keeps packed examples apart only without either"
)
UNPACKABLE_METHODS = {
    "prompt": "its virtual tokens are prepended once per row, so in a packed row only the "
    "first example would read them",
    "prefix": _PREFIX_WHY,
    "mam": f"its prefix half: {_PREFIX_WHY}",
}
SCHEDULES = (
    ("linear", "Linear decay"),
    ("cosine", "Cosine decay"),
    ("constant", "Constant"),
)
PRECISIONS = (
    ("auto", "Auto (bf16 on a GPU that has it, else fp32)"),
    ("fp32", "fp32"),
    ("bf16", "bf16"),
    ("fp16", "fp16 (with a gradient scaler)"),
)
PARALLELS = (
    ("ddp", "Data parallel (DDP): every device holds the whole base"),
    ("fsdp", "Fully sharded (FSDP): the base's weights split over the devices"),
)
DEFAULT_MAX_NEW_TOKENS = 32
MAX_NEW_TOKENS = 512


def eval_metric_names(names: Any) -> tuple[str, ...]:
    """TrainConfig.eval_metrics as a tuple of known metric names, each once, in their order
    (a comma-separated string is read too, as the CLI and a form write it)."""
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    names = names_tuple(names, "eval_metrics")
    unknown = [name for name in names if name not in EVAL_METRICS]
    if unknown:
        raise ConfigError(
            "eval_metrics",
            f"unknown eval metric {unknown[0]!r}; known: {', '.join(EVAL_METRICS)}",
        )
    return tuple(name for name in EVAL_METRICS if name in names)


def refuse_eval_metrics(
    names: Any, *, task: str, columns: tuple[str, ...] | list[str] | None = None
) -> None:
    """Task metrics (TrainConfig.eval_metrics) are refused, saying why, where the task cannot
    compute them: a classification metric on generation or back, or generation metrics on
    rows without a prompt and a completion to compare with (`columns`, where known)."""
    names = eval_metric_names(names)
    fitting = METRICS_BY_TASK.get(task, ())
    foreign = [name for name in names if name not in fitting]
    if foreign:
        kind = "classification" if task == "seq-cls" else "generation (causal LM)"
        raise ConfigError(
            "eval_metrics",
            f"{foreign[0]} does not apply to {kind}: this task takes {', '.join(fitting)}",
        )
    if task == "causal-lm" and names and columns is not None and "prompt" not in columns:
        raise ConfigError(
            "eval_metrics",
            f"{names[0]} scores the answer to each prompt against its completion; this "
            "dataset has text rows (no prompt,completion columns), so only the loss applies",
        )


ATTENTIONS = (
    ("auto", "The model's default (SDPA where it has it)"),
    ("sdpa", "SDPA (PyTorch's fused attention)"),
    ("eager", "Eager (plain matmuls)"),
    ("flash", "Flash attention 2 (where installed)"),
)


@dataclass(frozen=True)
class TrainConfig:
    """The training loop's settings (train.py); every method trains under the same ones."""

    steps: int = setting(30, "Steps", "Optimizer steps.", kind=int, low=1, high=MAX_STEPS)
    batch_size: int = setting(
        4,
        "Batch size",
        "Examples per optimizer step. Larger batches give steadier steps and need more memory.",
        kind=int,
        low=1,
        high=1024,
    )
    learning_rate: float = setting(
        2e-4,
        "Learning rate",
        "AdamW peak learning rate (linear warmup, then linear decay).",
        kind=float,
        low=0,
        low_open=True,
        high=MAX_LEARNING_RATE,
    )
    max_length: int = setting(
        128,
        "Max tokens",
        "Tokens per example; longer examples are truncated.",
        kind=int,
        low=2,
        high=65_536,
    )
    warmup_steps: int = setting(
        0, "Warmup steps", "Steps of linear warmup, at most steps.", kind=int, low=0, high=MAX_STEPS
    )
    eval_every: int = setting(
        0,
        "Evaluate every",
        "Evaluate on the validation split every N steps (0: only at the end).",
        kind=int,
        low=0,
        high=MAX_STEPS,
    )
    eval_batches: int = setting(
        8, "Eval batches", "Batches per evaluation.", kind=int, low=1, high=10_000
    )
    eval_metrics: tuple[str, ...] = setting(
        (),
        "Task metrics",
        "Scored at every evaluation beside the loss, and for the base model before training. "
        "Classification: accuracy, macro_f1. Generation (causal LM, prompt,completion rows): "
        "exact_match, contains, token_f1, rouge_l, chrf, on greedy answers to the first "
        "eval_batches × batch_size validation prompts.",
    )
    max_new_tokens: int = setting(
        DEFAULT_MAX_NEW_TOKENS,
        "Max new tokens",
        "Generation metrics: the longest answer generated per prompt (each stops at its eos).",
        kind=int,
        low=1,
        high=MAX_NEW_TOKENS,
    )
    grad_clip: float = setting(
        1.0, "Gradient clipping", "Max gradient norm; 0 turns clipping off.", kind=float, low=0
    )
    schedule: str = setting(
        "linear",
        "Schedule",
        "Learning rate after warmup: linear decay to ~0, cosine decay to ~0, or constant.",
        kind=str,
        choices=SCHEDULES,
    )
    grad_accum: int = setting(
        1,
        "Gradient accumulation",
        "Micro-batches of batch_size per optimizer step: the step sees grad_accum × batch_size "
        "examples with the memory of one micro-batch.",
        kind=int,
        low=1,
        high=1024,
    )
    gradient_checkpointing: bool = setting(
        False,
        "Gradient checkpointing",
        "Recompute each block's activations in the backward pass instead of keeping them: "
        "much less activation memory for about a third more compute.",
        kind=bool,
    )
    precision: str = setting(
        "auto",
        "Precision",
        "The base model's compute dtype: bf16 (autocast, on a bf16 base) or fp16 (with a "
        "gradient scaler); the adapter keeps fp32 weights. auto: bf16 on a GPU that has it, "
        "else fp32.",
        kind=str,
        choices=PRECISIONS,
    )
    quantize: str = setting(
        "none",
        "Quantise the base",
        "Load the frozen base in 4-bit NF4 (QLoRA) or int8 through bitsandbytes: about a "
        "quarter (NF4) or half (int8) of bf16's weight memory. LoRA, DoRA, (IA)³, prompt "
        "and prefix tuning train on it; the adapter stays full precision.",
        kind=str,
        choices=QUANTIZE_CHOICES,
    )
    attn: str = setting(
        "auto",
        "Attention",
        "The attention kernel: the model's default, sdpa (PyTorch's fused attention), eager "
        "(plain matmuls) or flash (flash-attn 2, where installed).",
        kind=str,
        choices=ATTENTIONS,
    )
    packing: bool = setting(
        False,
        "Packing",
        "Causal LM: concatenate examples into rows of max_length tokens, each example "
        "attending only to itself with its positions restarting, so a batch is nearly free "
        "of padding; batch_size then counts rows. Evaluation stays unpacked.",
        kind=bool,
    )
    parallel: str = setting(
        "ddp",
        "Over several devices",
        "How a run over 2 or more devices splits the work. ddp: every device holds the whole "
        "base and trains a share of each batch. fsdp: the frozen base's weights are split "
        "over the devices (FSDP), for a base that does not fit one; the adapter stays whole "
        "on each. Both train the adapter one process would.",
        kind=str,
        choices=PARALLELS,
    )
    measure: str = setting(
        "quick",
        "Measurement after training",
        "quick: the inference latency over 4 interleaved rounds of one 32-token row and 2 "
        "sample answers about as long as the expected ones, a few seconds. full: 31 rounds "
        "of a 4 × 256 batch and 8 answers, for figures to publish.",
        kind=str,
        choices=(("quick", "Quick"), ("full", "Full profile")),
    )
    early_stop_patience: int = setting(
        0,
        "Early stop patience",
        "Stop when the eval loss has not improved for this many evaluations in a row (needs "
        "eval_every); 0: never.",
        kind=int,
        low=0,
        high=10_000,
    )
    seed: int = setting(
        0,
        "Seed",
        "Seeds the adapter's initialisation, the batch order and dropout.",
        kind=int,
        low=0,
        high=2**32 - 1,
    )
    log_every: int = setting(
        1, "Log every", "Steps between metric reports.", kind=int, low=1, high=MAX_STEPS
    )
    checkpoint_every: int = setting(
        0,
        "Checkpoint every",
        "Steps between checkpoints a run resumes from (0: never).",
        kind=int,
        low=0,
        high=MAX_STEPS,
    )
    max_nonfinite_steps: int = setting(
        3,
        "Non-finite steps allowed",
        "This many non-finite steps in a row end the run.",
        kind=int,
        low=1,
        high=1000,
    )

    def __post_init__(self) -> None:
        check_settings(self)
        object.__setattr__(self, "eval_metrics", eval_metric_names(self.eval_metrics))
        if self.warmup_steps > self.steps:
            message = f"warmup_steps must be at most steps ({self.steps}), got {self.warmup_steps}"
            raise ConfigError("warmup_steps", message)
        if self.early_stop_patience and not self.eval_every:
            message = "early_stop_patience needs eval_every > 0: it counts evaluations"
            raise ConfigError("early_stop_patience", message)

    def trajectory_digest(self) -> str:
        """sha256 of TRAJECTORY_FIELDS: equal digests train along the same path."""
        fields = {name: getattr(self, name) for name in TRAJECTORY_FIELDS}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
