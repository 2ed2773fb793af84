"""One small form per PEFT method, drawn from its peft_core config, which stays the judge.

Each field that is a config field takes its label, help, default and bounds from the
config's field metadata (peft_core.configs, torch-free), and `clean()` builds the config
with `peft_core.registry.build_config`: a value the config refuses is a form error beside
its field, with the config's own message, before anything is queued. So the page, the
API (which posts these forms) and a sweep's every item refuse exactly what a worker
would, and share the CLI's defaults.

What stays here is presentation: each method's summary, and fields the form writes as
text where the config takes a type (LoRA's target_modules: "default", "all-linear", names
separated by commas, or a regex; see TargetModulesField).
"""

import itertools
import re
from dataclasses import dataclass, field

from django import forms
from django.core.exceptions import ValidationError

from peft_core.checks import SETTING, ConfigError, Setting, config_field, settings
from peft_core.configs import (
    ALL_LINEAR,
    BottleneckConfig,
    LoraConfig,
    MAMConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TrainConfig,
    refuse_packing,
    refuse_quantized,
)
from peft_core.registry import METHOD_CONFIGS, build_config

DEFAULT_TARGETS = "default"
TARGET_NAMES = re.compile(r"[A-Za-z_][\w.]*(\s*,\s*[A-Za-z_][\w.]*)*")


class TargetModulesField(forms.CharField):
    r"""target_modules as text: "default" (the architecture's, found from its structure),
    "all-linear", names separated by commas ("q_proj, v_proj": a module matches a name it
    ends with, HF PEFT's rule for a list), else a regex matched against the whole module
    path (HF PEFT's rule for a string), e.g. `.*layers\.(0|1)\..*(q|v)_proj`."""

    def to_python(self, value):
        text = super().to_python(value).strip()
        if text in ("", DEFAULT_TARGETS):
            return None
        if text == ALL_LINEAR or not TARGET_NAMES.fullmatch(text):
            return text
        return [name.strip() for name in text.split(",")]

    def prepare_value(self, value):
        if value is None:
            return DEFAULT_TARGETS
        return ", ".join(value) if isinstance(value, list | tuple) else value


class OptionalCountField(forms.IntegerField):
    """A config count that may be None: blank or 0 is None (0 lets a sweep list "none")."""

    def to_python(self, value):
        number = super().to_python(value)
        return None if number == 0 else number

    def widget_attrs(self, widget):
        return super().widget_attrs(widget) | {"min": 0}  # the browser lets 0 through


def settings_field(config_cls: type, name: str) -> forms.Field:
    """The form field of config field `name`: its label, help, default and bounds."""
    declared = config_field(config_cls, name)
    rule: Setting = declared.metadata[SETTING]
    kwargs = {
        "label": rule.label,
        "help_text": _help_text(rule),
        "initial": declared.default,
        "required": rule.none_means is None,
    }
    return _FIELD_BUILDERS[rule.kind](rule, **kwargs)


def _help_text(rule: Setting) -> str:
    if rule.none_means is None:
        return rule.help
    blank = "Blank or 0" if rule.kind is int else "Blank"
    return f"{rule.help} {blank}: {rule.none_means}."


def _int_field(rule: Setting, **kwargs) -> forms.Field:
    field_class = forms.IntegerField if rule.none_means is None else OptionalCountField
    return field_class(min_value=rule.low, max_value=rule.high, **kwargs)


def _float_field(rule: Setting, **kwargs) -> forms.Field:
    # An open bound ((0, …) is drawn closed; clean() asks the config, which refuses the bound.
    return forms.FloatField(min_value=rule.low, max_value=rule.high, **kwargs)


def _bool_field(rule: Setting, **kwargs) -> forms.Field:
    return forms.BooleanField(**(kwargs | {"required": False}))  # unchecked: False


def _text_field(rule: Setting, **kwargs) -> forms.Field:
    if rule.choices:
        return forms.ChoiceField(choices=rule.choices, **kwargs)
    # A text the config takes as None when unset (prompt tuning's init_text): blank is None.
    empty = None if kwargs["initial"] is None else ""
    return forms.CharField(max_length=rule.max_chars, empty_value=empty, **kwargs)


_FIELD_BUILDERS = {int: _int_field, float: _float_field, bool: _bool_field, str: _text_field}


class MethodForm(forms.Form):
    method = ""  # peft_core.registry's key ("lora"); its config's title names the form
    title = ""
    summary = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.title = METHOD_CONFIGS[cls.method].title

    def clean(self):
        cleaned = super().clean()
        if not self.errors:  # the config judges complete values only
            self._ask_the_config()
        return cleaned

    def _ask_the_config(self) -> None:
        """Build the config, the one judge; its refusal is an error beside the field it names."""
        try:
            build_config(self.method, self.config_kwargs())
        except ConfigError as error:
            self.add_error(error.field if error.field in self.fields else None, str(error))
        except ValueError as error:
            self.add_error(None, str(error))

    def config_kwargs(self) -> dict:
        return dict(self.cleaned_data)


class LoraForm(MethodForm):
    method = "lora"
    summary = (
        "Adds a trainable low-rank update ΔW = (α/r)·B·A beside chosen linear layers. "
        "Mergeable: after merging, inference costs exactly what the base model costs."
    )
    r = settings_field(LoraConfig, "r")
    alpha = settings_field(LoraConfig, "alpha")
    dropout = settings_field(LoraConfig, "dropout")
    target_modules = TargetModulesField(
        label="Adapted layers",
        initial=DEFAULT_TARGETS,
        required=False,
        max_length=500,
        help_text='Which linear layers get an adapter: "default" (attention query and '
        'value, found from the model\'s structure), "all-linear" (every linear layer but '
        "the output head: usually more learned per step, at a higher cost), names such as "
        '"q_proj, v_proj", or a regex matched against the whole module path. The estimate '
        "below lists the layers it matches.",
    )
    use_rslora = settings_field(LoraConfig, "use_rslora")

    def config_kwargs(self) -> dict:
        kwargs = dict(self.cleaned_data)
        if kwargs["target_modules"] is None:
            del kwargs["target_modules"]
        return kwargs


class DoraForm(LoraForm):
    method = "dora"
    summary = (
        "LoRA on the direction of each weight row plus a trainable magnitude per output: "
        "W = m·(W0 + ΔW)/‖W0 + ΔW‖. Often closer to full fine-tuning than LoRA at the same "
        "rank; mergeable."
    )


class IA3Form(MethodForm):
    method = "ia3"
    summary = (
        "Learns one scaling vector each for the attention keys, values and the feed-forward "
        "activation: the fewest trainable parameters of all methods, mergeable into the weights."
    )
    targets = forms.ChoiceField(
        label="Scaled layers",
        choices=[("default", "Architecture default (keys, values, feed-forward input)")],
        initial="default",
        help_text="Which activations get a learned scale; the defaults follow the paper.",
    )

    def config_kwargs(self) -> dict:
        return {}


class PromptTuningForm(MethodForm):
    method = "prompt"
    summary = (
        "Learns p soft tokens placed before the input embeddings: p·d parameters, nothing "
        "else changes. Tiny and swappable; strongest on large models."
    )
    num_virtual_tokens = settings_field(PromptTuningConfig, "num_virtual_tokens")
    init = settings_field(PromptTuningConfig, "init")
    init_text = settings_field(PromptTuningConfig, "init_text")

    def config_kwargs(self) -> dict:
        kwargs = dict(self.cleaned_data)
        if kwargs["init"] == "text":
            kwargs["init_text"] = kwargs["init_text"] or None  # blank: the config asks for one
        else:
            kwargs.pop("init_text")
        return kwargs


class PrefixTuningForm(MethodForm):
    method = "prefix"
    summary = (
        "Learns p key/value pairs that every attention layer attends to before the input: "
        "steers attention at each layer; p·L·2·d_kv parameters are saved."
    )
    num_virtual_tokens = settings_field(PrefixTuningConfig, "num_virtual_tokens")
    projection_dim = settings_field(PrefixTuningConfig, "projection_dim")


class BottleneckForm(MethodForm):
    method = "bottleneck"
    summary = (
        "Small down/up-projection modules x + f(x·W_down)·W_up inside every layer "
        "(Houlsby: after attention and FFN; Pfeiffer: after the FFN; parallel: beside the "
        "FFN). The up-projection starts at zero, so training starts from the base model."
    )
    placement = settings_field(BottleneckConfig, "placement")
    bottleneck_dim = settings_field(BottleneckConfig, "bottleneck_dim")
    activation = settings_field(BottleneckConfig, "activation")
    scaling = settings_field(BottleneckConfig, "scaling")
    dropout = settings_field(BottleneckConfig, "dropout")


class MAMForm(MethodForm):
    method = "mam"
    summary = (
        "“Mix-and-match”: a scaled parallel adapter beside the FFN plus prefix tuning in "
        "attention, trained together (He et al., 2022)."
    )
    num_virtual_tokens = settings_field(MAMConfig, "num_virtual_tokens")
    projection_dim = settings_field(MAMConfig, "projection_dim")
    bottleneck_dim = settings_field(MAMConfig, "bottleneck_dim")
    scaling = settings_field(MAMConfig, "scaling")
    activation = settings_field(MAMConfig, "activation")


HAND_MADE_FORMS = (
    LoraForm,
    DoraForm,
    IA3Form,
    PromptTuningForm,
    PrefixTuningForm,
    BottleneckForm,
    MAMForm,
)


def form_settings(config_cls: type) -> list[str]:
    """The config's fields a form can offer: those whose setting has a plain kind (not a
    list of module names or a regex, which the CLI and API take)."""
    return [
        name for name, (_, rule) in settings(config_cls).items() if rule.kind in _FIELD_BUILDERS
    ]


def generic_method_form(method: str) -> type[MethodForm]:
    """A form offering every field of the method's config that declares its setting, in
    the config's order, summarised by the config's docstring: what a new method gets until
    it wants a hand-made form (choices in place of free text, fields left out)."""
    config_cls = METHOD_CONFIGS[method]
    fields = {name: settings_field(config_cls, name) for name in form_settings(config_cls)}
    summary = (config_cls.__doc__ or "").strip().split("\n\n")[0]
    attrs = {"method": method, "summary": " ".join(summary.split()), **fields}
    return type(f"{config_cls.__name__}Form", (MethodForm,), attrs)


# In peft_core's method order (methods.METHOD_LIST); test_every_method_is_offered checks.
METHOD_FORMS: dict[str, type[MethodForm]] = {
    method: next((f for f in HAND_MADE_FORMS if f.method == method), None)
    or generic_method_form(method)
    for method in METHOD_CONFIGS
}


def method_choices() -> list[tuple[str, str]]:
    return [(key, form.title) for key, form in METHOD_FORMS.items()]


MAX_SWEEP_RUNS = 64
MAX_SEEDS = 10  # repeats of each configuration (sweep "seeds"): each is a run


@dataclass(frozen=True)
class SweepItem:
    method: str
    config: dict
    label: str  # "lora r=8 train.schedule=cosine": what differs from the defaults
    train: dict = field(default_factory=dict)  # the grid's training settings for this run


# A grid line "train.<field> = a, b" varies a training setting across every method's runs.
TRAIN_AXIS = "train"
TRAIN_GRID_FIELDS = (
    "steps", "batch_size", "learning_rate", "max_length", "warmup_steps", "schedule",
    "grad_accum", "gradient_checkpointing", "precision", "quantize", "attn", "packing",
    "grad_clip", "seed",
)  # fmt: skip
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def method_defaults(method: str) -> dict[str, str]:
    """Form data that equals the method's defaults (an unchecked box is left out)."""
    fields = METHOD_FORMS[method].base_fields
    return {
        name: str(f.initial)
        for name, f in fields.items()
        if f.initial is not None and f.initial is not False  # 0 is a value, False a blank box
    }


def method_form_initial(method: str, config: dict) -> dict:
    """A method form's initial values from a stored config (the inverse of config_kwargs)."""
    if method not in METHOD_FORMS:
        return {}
    fields = METHOD_FORMS[method].base_fields
    initial = {name: field.initial for name, field in fields.items()}
    return initial | {name: value for name, value in config.items() if name in fields}


def expand_sweep(
    methods: list[str],
    grid: dict[str, list[str]],
    train_config: dict | None = None,
    task: str | None = None,
    seeds: int = 1,
) -> list[SweepItem]:
    """Every method × every combination of its listed values × every combination of the
    "train." lists, each judged by its method's form (and so its config) and, given the
    launch's `train_config`, by TrainConfig (and, given the dataset's `task`, whether it packs);
    with `seeds` > 1, each of them that many times, seeds seed, seed + 1, … (a run each)."""
    _check_grid_keys(methods, grid)
    train_lists = {k.split(".", 1)[1]: v for k, v in grid.items() if k.startswith(TRAIN_AXIS + ".")}
    trains = [
        dict(zip(train_lists, combo, strict=True))
        for combo in itertools.product(*train_lists.values())
    ]
    items = []
    for method in methods:
        lists = {k.split(".", 1)[1]: v for k, v in grid.items() if k.split(".", 1)[0] == method}
        for combo in itertools.product(*lists.values()):
            overrides = dict(zip(lists, combo, strict=True))
            item = _sweep_item(method, overrides)
            items += [_with_training(item, train, train_config, task) for train in trains]
    if seeds > 1:
        items = _seeded(items, seeds, train_config or {})
    if len(items) > MAX_SWEEP_RUNS:
        raise ValidationError(f"{len(items)} runs: a sweep holds at most {MAX_SWEEP_RUNS}.")
    return items


def _with_training(
    item: SweepItem, texts: dict[str, str], base: dict | None, task: str | None
) -> SweepItem:
    """`item` with the grid's training settings, typed and judged by TrainConfig (and whether
    the method trains on the base they quantise, and packed on the task)."""
    train = {name: _typed(TrainConfig, name, text) for name, text in texts.items()}
    settings = ({} if base is None else base) | train
    try:
        config = TrainConfig(**settings)
        refuse_quantized(item.method, config.quantize)
        refuse_packing(config.packing, method=item.method, task=task)
    except ConfigError as error:
        raise ValidationError(f"{item.label}: {error}") from None
    if not texts:
        return item
    label = " ".join([item.label, *(f"{TRAIN_AXIS}.{k}={v}" for k, v in texts.items())])
    return SweepItem(item.method, item.config, label, train)


def _seeded(items: list[SweepItem], seeds: int, train_config: dict) -> list[SweepItem]:
    """Each item `seeds` times, with train seeds base, base + 1, …: the compare page groups
    such runs as repeats of one configuration (confidence.py)."""
    if any(SEED in item.train for item in items):
        raise ValidationError(
            f"{TRAIN_AXIS}.{SEED} is listed in the grid: give seeds there or as a number of "
            "seeds, not both."
        )
    if not 1 <= seeds <= MAX_SEEDS:
        raise ValidationError(
            f"{seeds} seeds: a sweep repeats a configuration 1 to {MAX_SEEDS} times."
        )
    base = train_config.get(SEED, TrainConfig.seed)
    try:
        TrainConfig(**(train_config | {SEED: base + seeds - 1}))
    except ConfigError as error:
        raise ValidationError(f"Seeds {base} to {base + seeds - 1}: {error}") from None
    return [
        SweepItem(
            item.method, item.config, f"{item.label} · seed {seed}", item.train | {SEED: seed}
        )
        for item in items
        for seed in range(base, base + seeds)
    ]


SEED = "seed"


def _typed(config_cls: type, name: str, text: str):
    kind = config_field(config_cls, name).metadata[SETTING].kind
    try:
        if kind is bool:
            if text.lower() not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError
            return text.lower() in TRUE_WORDS
        return kind(text) if kind in (int, float) else text
    except ValueError:
        raise ValidationError(f"{TRAIN_AXIS}.{name}: {text!r} is not a {kind.__name__}") from None


def _check_grid_keys(methods: list[str], grid: dict[str, list[str]]) -> None:
    for key in grid:
        method, field = key.split(".", 1)
        if method == TRAIN_AXIS:
            if field not in TRAIN_GRID_FIELDS:
                known = ", ".join(TRAIN_GRID_FIELDS)
                raise ValidationError(f"{key}: train has no field {field} (it has {known}).")
            continue
        if method not in methods:
            raise ValidationError(f"{key}: {method} is not among the chosen methods.")
        if field not in METHOD_FORMS[method].base_fields:
            known = ", ".join(METHOD_FORMS[method].base_fields)
            raise ValidationError(f"{key}: {method} has no field {field} (it has {known}).")


def _sweep_item(method: str, overrides: dict[str, str]) -> SweepItem:
    form = METHOD_FORMS[method]({**method_defaults(method), **overrides})
    if not form.is_valid():
        problems = "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items())
        raise ValidationError(f"{method} {overrides}: {problems}")
    label = " ".join([method, *(f"{k}={v}" for k, v in overrides.items())])
    return SweepItem(method=method, config=form.config_kwargs(), label=label)
