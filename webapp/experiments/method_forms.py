"""One small form per PEFT method: its own fields, bounds, defaults and help text.

The launch page shows the fieldset of the chosen method (htmx swaps it when the method
changes); `config_kwargs()` turns the cleaned fields into the peft_core config's arguments.
"""

import itertools
from dataclasses import dataclass

from django import forms
from django.core.exceptions import ValidationError

TARGET_CHOICES = [
    ("default", "Architecture default (attention query and value)"),
    ("all-linear", "All linear layers (except the output head)"),
]
ACTIVATION_CHOICES = [("relu", "ReLU"), ("gelu", "GELU"), ("silu", "SiLU"), ("tanh", "tanh")]


class MethodForm(forms.Form):
    title = ""
    summary = ""

    def config_kwargs(self) -> dict:
        return dict(self.cleaned_data)


class LoraForm(MethodForm):
    title = "LoRA"
    summary = (
        "Adds a trainable low-rank update ΔW = (α/r)·B·A beside chosen linear layers. "
        "Mergeable: after merging, inference costs exactly what the base model costs."
    )
    r = forms.IntegerField(
        label="Rank r",
        min_value=1,
        max_value=256,
        initial=8,
        help_text="Width of the low-rank update B·A, its rank: higher r, more capacity and "
        "more parameters (r·(d_in + d_out) per adapted layer). 8 is a good start.",
    )
    alpha = forms.FloatField(
        label="Alpha",
        min_value=0.01,
        max_value=1024,
        initial=16,
        help_text="Strength of the update, which is scaled by alpha / r. 2·r is a common choice.",
    )
    dropout = forms.FloatField(
        min_value=0,
        max_value=0.9,
        initial=0.05,
        help_text="Dropout on the adapter's input while training, against overfitting "
        "(0 to disable).",
    )
    target_modules = forms.ChoiceField(
        label="Adapted layers",
        choices=TARGET_CHOICES,
        initial="default",
        help_text="Which linear layers get an adapter. All linear layers usually learn "
        "more per step, at a higher cost.",
    )
    use_rslora = forms.BooleanField(
        label="rsLoRA scaling",
        required=False,
        help_text="Scale by alpha / √r instead of alpha / r: keeps high ranks stable.",
    )

    def config_kwargs(self) -> dict:
        kwargs = dict(self.cleaned_data)
        if kwargs["target_modules"] == "default":
            del kwargs["target_modules"]
        return kwargs


class DoraForm(LoraForm):
    title = "DoRA"
    summary = (
        "LoRA on the direction of each weight row plus a trainable magnitude per output: "
        "W = m·(W0 + ΔW)/‖W0 + ΔW‖. Often closer to full fine-tuning than LoRA at the same "
        "rank; mergeable."
    )


class IA3Form(MethodForm):
    title = "(IA)³"
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


def _virtual_tokens(initial: int, help_text: str) -> forms.IntegerField:
    return forms.IntegerField(
        label="Virtual tokens p", min_value=1, max_value=512, initial=initial, help_text=help_text
    )


def _projection_dim() -> forms.IntegerField:
    return forms.IntegerField(
        label="Reparameterisation width h",
        min_value=0,
        max_value=4096,
        initial=0,
        help_text="0: train the prefix directly. h > 0: train it through an MLP of width h "
        "(steadier optimisation, as in the paper); only the projected prefix is saved.",
    )


def _bottleneck_dim(initial: int) -> forms.IntegerField:
    return forms.IntegerField(
        label="Bottleneck width m",
        min_value=1,
        max_value=4096,
        initial=initial,
        help_text="Bottleneck width: the adapter projects d down to m and back. Smaller m, "
        "fewer parameters (2·d·m + m + d per adapter).",
    )


def _activation() -> forms.ChoiceField:
    return forms.ChoiceField(
        choices=ACTIVATION_CHOICES,
        initial="relu",
        help_text="Nonlinearity f between the adapter's down- and up-projection.",
    )


def _none_if_zero(kwargs: dict, key: str) -> dict:
    if not kwargs.get(key):
        kwargs[key] = None
    return kwargs


class PromptTuningForm(MethodForm):
    title = "Prompt tuning"
    summary = (
        "Learns p soft tokens placed before the input embeddings: p·d parameters, nothing "
        "else changes. Tiny and swappable; strongest on large models."
    )
    num_virtual_tokens = _virtual_tokens(
        20,
        "Prompt length: learned soft tokens placed before every input (p·d parameters). "
        "They use up part of the context; 10 to 100 is usual.",
    )
    init = forms.ChoiceField(
        label="Initialisation",
        choices=[
            ("random", "Random"),
            ("vocab", "Embeddings of random vocabulary tokens"),
            ("text", "Embeddings of a text you give"),
        ],
        initial="random",
        help_text="Starting from real token embeddings (or a task description) often trains "
        "faster than random vectors.",
    )
    init_text = forms.CharField(
        label="Initial text",
        required=False,
        max_length=1000,
        help_text="For text initialisation, e.g. “Answer the instruction briefly:”.",
    )

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("init") == "text" and not cleaned.get("init_text"):
            self.add_error("init_text", "Text initialisation needs a text.")
        return cleaned

    def config_kwargs(self) -> dict:
        kwargs = dict(self.cleaned_data)
        if kwargs["init"] != "text":
            kwargs.pop("init_text")
        return kwargs


class PrefixTuningForm(MethodForm):
    title = "Prefix tuning"
    summary = (
        "Learns p key/value pairs that every attention layer attends to before the input: "
        "steers attention at each layer; p·L·2·d_kv parameters are saved."
    )
    num_virtual_tokens = _virtual_tokens(
        20,
        "Prefix length: virtual key/value tokens that every attention layer attends to "
        "before the input (p·L·2·d_kv parameters saved). Longer: more capacity, less context.",
    )
    projection_dim = _projection_dim()

    def config_kwargs(self) -> dict:
        return _none_if_zero(dict(self.cleaned_data), "projection_dim")


class BottleneckForm(MethodForm):
    title = "Bottleneck adapter"
    summary = (
        "Small down/up-projection modules x + f(x·W_down)·W_up inside every layer "
        "(Houlsby: after attention and FFN; Pfeiffer: after the FFN; parallel: beside the "
        "FFN). The up-projection starts at zero, so training starts from the base model."
    )
    placement = forms.ChoiceField(
        choices=[
            ("houlsby", "Houlsby — after attention and after the FFN"),
            ("pfeiffer", "Pfeiffer — after the FFN only"),
            ("parallel", "Parallel — beside the FFN, scaled"),
        ],
        initial="houlsby",
        help_text="Where the adapters sit; Houlsby has two per layer, the others one.",
    )
    bottleneck_dim = _bottleneck_dim(64)
    activation = _activation()
    scaling = forms.FloatField(
        min_value=0.01,
        max_value=100,
        initial=1.0,
        help_text="Parallel only: the adapter's output is multiplied by this (4 in the paper).",
    )
    dropout = forms.FloatField(
        min_value=0,
        max_value=0.9,
        initial=0.0,
        help_text="Dropout on the adapter's input while training (0 to disable).",
    )

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("placement") != "parallel" and cleaned.get("scaling") not in (None, 1.0):
            self.add_error(
                "scaling", "Only a parallel adapter is scaled; keep 1 for this placement."
            )
        return cleaned


class MAMForm(MethodForm):
    title = "MAM adapter"
    summary = (
        "“Mix-and-match”: a scaled parallel adapter beside the FFN plus prefix tuning in "
        "attention, trained together (He et al., 2022)."
    )
    num_virtual_tokens = _virtual_tokens(
        30, "Prefix length of the attention half: virtual key/value tokens at every layer."
    )
    projection_dim = _projection_dim()
    bottleneck_dim = _bottleneck_dim(64)
    scaling = forms.FloatField(
        min_value=0.01,
        max_value=100,
        initial=4.0,
        help_text="Multiplies the parallel adapter's output (4 in the paper).",
    )
    activation = _activation()

    def config_kwargs(self) -> dict:
        return _none_if_zero(dict(self.cleaned_data), "projection_dim")


METHOD_FORMS: dict[str, type[MethodForm]] = {
    "lora": LoraForm,
    "dora": DoraForm,
    "ia3": IA3Form,
    "prompt": PromptTuningForm,
    "prefix": PrefixTuningForm,
    "bottleneck": BottleneckForm,
    "mam": MAMForm,
}


def method_choices() -> list[tuple[str, str]]:
    return [(key, form.title) for key, form in METHOD_FORMS.items()]


MAX_SWEEP_RUNS = 64


@dataclass(frozen=True)
class SweepItem:
    method: str
    config: dict
    label: str  # "lora r=8": what differs from the method's defaults


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
    for name, value in config.items():
        if name in fields:
            initial[name] = 0 if value is None and name == "projection_dim" else value
    return initial


def expand_sweep(methods: list[str], grid: dict[str, list[str]]) -> list[SweepItem]:
    """Every method × every combination of its listed values, each validated by its form."""
    _check_grid_keys(methods, grid)
    items = []
    for method in methods:
        lists = {k.split(".", 1)[1]: v for k, v in grid.items() if k.split(".", 1)[0] == method}
        for combo in itertools.product(*lists.values()):
            overrides = dict(zip(lists, combo, strict=True))
            items.append(_sweep_item(method, overrides))
    if len(items) > MAX_SWEEP_RUNS:
        raise ValidationError(f"{len(items)} runs: a sweep holds at most {MAX_SWEEP_RUNS}.")
    return items


def _check_grid_keys(methods: list[str], grid: dict[str, list[str]]) -> None:
    for key in grid:
        method, field = key.split(".", 1)
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
