"""One small form per PEFT method: its own fields, bounds, defaults and help text.

The launch page shows the fieldset of the chosen method (htmx swaps it when the method
changes); `config_kwargs()` turns the cleaned fields into the peft_core config's arguments.
"""

from django import forms

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
        help_text="Width of the low-rank update. Higher r: more capacity, more parameters "
        "(r·(d_in + d_out) per adapted layer).",
    )
    alpha = forms.FloatField(
        label="Alpha",
        min_value=0.01,
        max_value=1024,
        initial=16,
        help_text="Scales the update by alpha / r. 2·r is a common choice.",
    )
    dropout = forms.FloatField(
        min_value=0,
        max_value=0.9,
        initial=0.05,
        help_text="Dropout on the adapter's input while training (0 to disable).",
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


METHOD_FORMS: dict[str, type[MethodForm]] = {"lora": LoraForm}


def method_choices() -> list[tuple[str, str]]:
    return [
        (key, f"{form.title} — {form.summary.split('.')[0]}") for key, form in METHOD_FORMS.items()
    ]
