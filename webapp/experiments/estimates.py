"""Before launch: what a run will cost, from the launch form's current values.

Trainable parameters (exact)
    The catalogue model's architecture is built on the meta device (every shape, no
    weights, no memory), `peft_core.apply` adds the method, and its trainable parameters
    are counted: the same number the run's profile will report. The architecture comes
    from the model's config.json (the model's cache directory once it has been used, the
    package for an HF-package model, `peft_core.tiny` for a tiny one); a GGUF model that
    has never been converted gives it from its file's header (transformers reads the GGUF
    metadata, no tensors: ~4 s once per process, so a fresh install counts too). Without
    any of those the count is "unknown until first use".
    Counts are cached per (model, task, labels, method, config): a keystroke costs ms.

Memory (rough estimate), in bytes, for float32 training with AdamW:
        4 · N_total                      weights, the adapter's included
      + 4 · 3 · N_trainable              gradients and AdamW's two moments
      + 4 · C · b · s · h · L            activations kept for the backward pass
      + 4 · 3 · b · s · V                causal LM only: logits, log-softmax, their gradient
    N: parameters, b: batch size, s: max tokens, h: hidden width, L: layers, V: vocabulary.
    C = 16 by default: summing the tensors autograd saves for SmolLM2-135M (LoRA, (IA)³,
    prompt tuning and bottleneck, b·s = 128 and 512) gives 11 to 17 floats per token per
    hidden unit per layer once the logits are counted apart. When the user's team has
    succeeded runs measured on a GPU (profile "memory_kind" = "cuda", whose
    "peak_memory_mb" is the peak of allocated tensors), C is the median that those runs
    imply instead. CPU runs measure RSS growth, which allocators blur; they are not used.
    The estimate ignores attention-score buffers, the virtual tokens of prompt tuning and
    framework overhead: it is a rough figure, and the page says so.

Time (from similar past runs)
    Among the user's visible succeeded runs (never another team's: the *_for_user
    selector) on the same base model and method, or on the same model with any method when
    none share the method, the median seconds per step (profile "wall_s" / steps, each
    scaled by b·s relative to that run's b·s) times the steps asked for.
"""

import logging
import re
import statistics
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError

from webapp.experiments import heavy, selectors
from webapp.experiments.forms import RunForm, SweepForm
from webapp.experiments.method_forms import METHOD_FORMS, expand_sweep
from webapp.experiments.models import RunStatus
from webapp.registry.selectors import model_directory, model_for_team

logger = logging.getLogger(__name__)
LAYER_INDEX = re.compile(r"\.(\d+)\.")
BYTES = 4  # float32
ACTIVATION_FLOATS = 16.0  # C: floats per token, hidden unit and layer (calibrated above)
LOGIT_COPIES = 3  # logits, their log-softmax and its gradient
CALIBRATION_RUNS = 50  # the newest measured runs that recalibrate C
SIMILAR_RUNS = 50  # the newest similar runs whose speed is used
MAX_SWEEP_ITEMS = 12  # a sweep's estimate covers at most this many of its runs
ESTIMATE_FIELDS = ("base_model", "dataset", "method", "methods", "grid")
ESTIMATE_FIELDS += ("steps", "batch_size", "max_length")


class UnknownArchitecture(Exception):
    """The model's config.json does not exist yet (a GGUF model never converted)."""


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    vocab: int


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int
    modules: tuple[str, ...] = ()  # the paths of the modules the method adapts

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def module_patterns(self) -> list[tuple[str, int]]:
        """The adapted modules with the layer index as <i>: (pattern, how many), in order."""
        counts: dict[str, int] = {}
        for path in self.modules:
            pattern = LAYER_INDEX.sub(".<i>.", path, count=1)
            counts[pattern] = counts.get(pattern, 0) + 1
        return list(counts.items())


@dataclass(frozen=True)
class Memory:
    weights: int
    training_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.training_state + self.activations


@dataclass(frozen=True)
class Duration:
    seconds: float
    runs: int  # how many past runs it comes from
    same_method: bool  # False: from runs of the same model with other methods

    @property
    def text(self) -> str:
        return duration_text(self.seconds)


@dataclass(frozen=True)
class ItemEstimate:
    label: str
    params: ParamCount | None  # None: the architecture is unknown until first use
    memory: Memory | None
    duration: Duration | None  # None: no similar run yet
    fit: Any = None  # peft_core.preflight.Fit against the workers' memory; None: unknown


@dataclass(frozen=True)
class LaunchEstimate:
    items: list[ItemEstimate]
    total_items: int = 1  # a sweep's run count (items holds at most MAX_SWEEP_ITEMS)
    problem: str = ""  # set when the form's values give no estimate
    worker_memory: int = 0  # bytes a training worker has (worker_memory_bytes)
    worker_memory_set: bool = False  # PEFTLAB_WORKER_MEMORY_GIB, not this machine's memory

    @property
    def too_big(self) -> list[ItemEstimate]:
        """The items whose pre-flight peak exceeds the workers' memory."""
        return [item for item in self.items if item.fit is not None and not item.fit.ok]

    @property
    def trainable_span(self) -> tuple[int, int] | None:
        return _span([item.params.trainable for item in self.items if item.params])

    @property
    def peak_span(self) -> tuple[int, int] | None:
        """The pre-flight peaks' range, where every item has one."""
        if not self.items or any(item.fit is None for item in self.items):
            return None
        return _span([item.fit.peak for item in self.items])

    @property
    def memory_span(self) -> tuple[int, int] | None:
        return _span([item.memory.total for item in self.items if item.memory])

    @property
    def duration_span_text(self) -> str:
        """'about 2 min to about 5 min' per run, or '' when no item has a duration."""
        span = _span([item.duration.seconds for item in self.items if item.duration])
        if span is None:
            return ""
        low, high = (duration_text(seconds) for seconds in span)
        return low if low == high else f"{low} to {high}"


def _span(values: list) -> tuple | None:
    return (min(values), max(values)) if values else None


def duration_text(seconds: float) -> str:
    if seconds < 60:
        return "under a minute"
    if seconds < 2 * 3600:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


# ---- the architecture (torch, loaded at the first estimate) ---------------------------------


def model_shape(model_key: str) -> Shape:
    return heavy.architecture().model_shape(model_key)


def parameter_count(
    *, model_key: str, task: str, num_labels: int, method: str, config: dict
) -> ParamCount:
    """Trainable and total parameters of `method` on the model; raises UnknownArchitecture."""
    return heavy.architecture().parameter_count(
        model_key=model_key, task=task, num_labels=num_labels, method=method, config=config
    )


# ---- memory -------------------------------------------------------------------------------


def memory_estimate(
    *, shape: Shape, params: ParamCount, task: str, batch_size: int, max_length: int, floats: float
) -> Memory:
    tokens = batch_size * max_length
    activations = floats * tokens * shape.hidden * shape.layers
    if task == "causal-lm":
        activations += LOGIT_COPIES * tokens * shape.vocab
    return Memory(
        weights=BYTES * params.total,
        training_state=BYTES * 3 * params.trainable,
        activations=int(BYTES * activations),
    )


def activation_floats(*, user) -> float:
    """C, from the team's GPU-measured runs when there are any (see the module docstring)."""
    runs = (
        selectors.run_list_for_user(user=user)
        .filter(status=RunStatus.SUCCEEDED, external=False, profile__memory_kind="cuda")
        .order_by("-finished_at")
        .values_list("base_model", "dataset__task", "train_config", "profile")[:CALIBRATION_RUNS]
    )
    implied = [c for c in (_implied_floats(*run) for run in runs) if c is not None]
    return float(min(max(statistics.median(implied), 2.0), 200.0)) if implied else ACTIVATION_FLOATS


def _implied_floats(model_key: str, task: str, train: dict, profile: dict) -> float | None:
    try:
        shape = model_shape(model_key)
        tokens = int(train.get("batch_size", 4)) * int(train.get("max_length", 128))
        peak = float(profile["peak_memory_mb"]) * 2**20
        state = BYTES * (int(profile["total_params"]) + 3 * int(profile["trainable_params"]))
    except (KeyError, TypeError, ValueError, UnknownArchitecture):
        return None
    logits = BYTES * LOGIT_COPIES * tokens * shape.vocab if task == "causal-lm" else 0
    floats = (peak - state - logits) / (BYTES * tokens * shape.hidden * shape.layers)
    return floats if floats > 0 else None


# ---- time ---------------------------------------------------------------------------------


def similar_runs(*, user, model_key: str) -> list[tuple[str, dict, dict]]:
    """(method, train_config, profile) of the user's newest succeeded runs on the model."""
    runs = (
        selectors.run_list_for_user(user=user)
        .filter(status=RunStatus.SUCCEEDED, external=False, base_model=model_key, attempt__lte=1)
        .order_by("-finished_at")
        .values_list("method", "train_config", "profile")
    )
    return list(runs[: SIMILAR_RUNS * 4])


def duration_estimate(
    *, runs: list[tuple[str, dict, dict]], method: str, steps: int, batch_size: int, max_length: int
) -> Duration | None:
    """Median speed of the runs with `method` (or of all of them when none has it) × steps."""
    same = [run for run in runs if run[0] == method]
    rates = [_seconds_per_token_step(train, profile) for _, train, profile in same or runs]
    rates = [rate for rate in rates if rate is not None][:SIMILAR_RUNS]
    if not rates:
        return None
    seconds = statistics.median(rates) * batch_size * max_length * steps
    return Duration(seconds=seconds, runs=len(rates), same_method=bool(same))


def _seconds_per_token_step(train: dict, profile: dict) -> float | None:
    """A past run's seconds per step per (batch × max tokens)."""
    try:
        wall = float(profile["wall_s"])
        steps = int(train.get("steps", 30))
        tokens = int(train.get("batch_size", 4)) * int(train.get("max_length", 128))
    except (KeyError, TypeError, ValueError):
        return None
    if not (wall > 0 and steps > 0 and tokens > 0):
        return None
    return wall / steps / tokens


# ---- the form -----------------------------------------------------------------------------


def launch_estimate(*, user, data) -> LaunchEstimate:
    """The estimate for a launch form's values (RunForm's, or SweepForm's when `data` holds a
    grid); `problem` is set, never an exception raised, when the values are not valid."""
    projects = selectors.project_list_for_launch(user=user)
    datasets = selectors.dataset_list_for_user(user=user)
    is_sweep = "grid" in data
    form_class = SweepForm if is_sweep else RunForm
    form = form_class(data, projects=projects, datasets=datasets)
    form.is_valid()
    if any(name in form.errors for name in ESTIMATE_FIELDS):
        return LaunchEstimate(items=[], problem=FIX_THE_FORM)
    try:
        items = _sweep_items(form.cleaned_data) if is_sweep else [_run_item(form, data)]
        context = _Context.build(user, form.cleaned_data, form.train_config())
    except (ValidationError, ValueError, TypeError):  # a config peft_core refuses
        return LaunchEstimate(items=[], problem=FIX_THE_FORM)
    try:
        estimates = [context.estimate(*item) for item in items[:MAX_SWEEP_ITEMS]]
    except (ValueError, TypeError) as error:  # the method does not fit this model: say why
        return LaunchEstimate(items=[], problem=f"This would fail on the model: {error}")
    return LaunchEstimate(
        items=estimates,
        total_items=len(items) * (form.cleaned_data.get("seeds") or 1),  # a sweep's repeats
        worker_memory=context.worker_memory,
        worker_memory_set=bool(settings.WORKER_MEMORY_GIB),
    )


def worker_memory_bytes() -> int:
    """A training worker's memory: PEFTLAB_WORKER_MEMORY_GIB, else this machine's total (the
    web server is not the worker machine: the page says which it used)."""
    if settings.WORKER_MEMORY_GIB:
        return settings.WORKER_MEMORY_GIB * 2**30
    import psutil

    return int(psutil.virtual_memory().total)


FIX_THE_FORM = "Fix the form to see estimates."


def architecture_key(team, name: str) -> str:
    """What architecture.py reads a model's config by: a catalogue key, or a registered
    model's directory (found without the network; the row was checked when registered)."""
    model = model_for_team(team=team, name=name)
    directory = model_directory(model) if model is not None else None
    return str(directory) if directory is not None else name


def _run_item(form, data) -> tuple[str, str, dict]:
    method = form.cleaned_data["method"]
    method_form = METHOD_FORMS[method](data)
    if not method_form.is_valid():
        raise ValidationError("invalid method settings")
    return (method_form.title, method, method_form.config_kwargs())


def _sweep_items(cleaned: dict) -> list[tuple[str, str, dict]]:
    return [
        (i.label, i.method, i.config) for i in expand_sweep(cleaned["methods"], cleaned["grid"])
    ]


@dataclass(frozen=True)
class _Context:
    """What every item of one launch shares: the form's values and the team's past runs."""

    model_key: str
    task: str
    num_labels: int
    steps: int
    batch_size: int
    max_length: int
    floats: float
    runs: list
    train: dict  # the form's TrainConfig fields (a sweep's, before its train.* axes)
    worker_memory: int

    @classmethod
    def build(cls, user, cleaned: dict, train: dict) -> "_Context":
        dataset = cleaned["dataset"]
        return cls(
            train=train,
            worker_memory=worker_memory_bytes(),
            model_key=architecture_key(cleaned["project"].team, cleaned["base_model"]),
            task=dataset.task,
            num_labels=max(len(dataset.label_names or ()), 2),
            steps=cleaned["steps"],
            batch_size=cleaned["batch_size"],
            max_length=cleaned["max_length"],
            floats=activation_floats(user=user),
            runs=similar_runs(user=user, model_key=cleaned["base_model"]),
        )

    def estimate(self, label: str, method: str, config: dict) -> ItemEstimate:
        duration = duration_estimate(
            runs=self.runs,
            method=method,
            steps=self.steps,
            batch_size=self.batch_size,
            max_length=self.max_length,
        )
        try:
            params = parameter_count(
                model_key=self.model_key,
                task=self.task,
                num_labels=self.num_labels,
                method=method,
                config=config,
            )
            shape = model_shape(self.model_key)
        except UnknownArchitecture:
            return ItemEstimate(label=label, params=None, memory=None, duration=duration)
        memory = memory_estimate(
            shape=shape,
            params=params,
            task=self.task,
            batch_size=self.batch_size,
            max_length=self.max_length,
            floats=self.floats,
        )
        fit = self._preflight(method, config)
        return ItemEstimate(label=label, params=params, memory=memory, duration=duration, fit=fit)

    def _preflight(self, method: str, config: dict):
        """The pre-flight's peak against the workers' memory (peft_core.preflight)."""
        architecture = heavy.architecture()
        try:
            estimate = architecture.preflight_estimate(
                model_key=self.model_key,
                task=self.task,
                num_labels=self.num_labels,
                method=method,
                config=config,
                train=self.train,
            )
        except Exception:  # an architecture the estimate cannot read: the worker skips it too
            logger.warning("no pre-flight estimate for %s", self.model_key, exc_info=True)
            return None
        return estimate.fits(self.worker_memory)
