"""Forms validate bounds and shapes; the services do the writes."""

from django import forms
from django.conf import settings

from peft_core.catalogue import CATALOGUE
from webapp.experiments.method_forms import method_choices
from webapp.experiments.models import TaskType


def model_choices() -> list[tuple[str, str]]:
    return [(spec.key, spec.title) for spec in CATALOGUE.values()]


class LaunchForm(forms.Form):
    """What a run and a sweep share: where, on what, and how long to train."""

    name = forms.CharField(
        max_length=120,
        help_text="A name, shown in lists and charts.",
    )
    project = forms.ModelChoiceField(queryset=None, empty_label=None)
    base_model = forms.ChoiceField(
        label="Base model",
        choices=model_choices,
        help_text="The frozen model the adapter is trained on. All models here work offline.",
    )
    dataset = forms.ModelChoiceField(
        queryset=None,
        empty_label=None,
        help_text="Built-in samples need no upload. The task of the dataset decides the head.",
    )
    steps = forms.IntegerField(
        min_value=1,
        max_value=100_000,
        initial=30,
        help_text="Optimizer steps. 30 is enough to see the loss fall on the built-in samples.",
    )
    batch_size = forms.IntegerField(
        min_value=1, max_value=256, initial=4, help_text="Examples per step."
    )
    learning_rate = forms.FloatField(
        min_value=1e-7,
        max_value=1.0,
        initial=1e-3,
        help_text="AdamW peak learning rate (linear decay). Adapters take higher rates than "
        "full fine-tuning; lower it if the loss jumps.",
    )
    max_length = forms.IntegerField(
        label="Max tokens",
        min_value=16,
        max_value=4096,
        initial=128,
        help_text="Longer examples are truncated.",
    )
    eval_every = forms.IntegerField(
        min_value=0,
        max_value=100_000,
        initial=10,
        help_text="Evaluate on the validation split every N steps (0: only at the end).",
    )

    def __init__(self, *args, projects, datasets, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["project"].queryset = projects
        self.fields["dataset"].queryset = datasets

    def clean(self):
        cleaned = super().clean()
        model_key, dataset = cleaned.get("base_model"), cleaned.get("dataset")
        if model_key and dataset and dataset.task not in CATALOGUE[model_key].tasks:
            tasks = ", ".join(CATALOGUE[model_key].tasks)
            self.add_error(
                "dataset",
                f"{CATALOGUE[model_key].title} supports {tasks}; this dataset is {dataset.task}.",
            )
        return cleaned

    def train_config(self) -> dict:
        keys = ("steps", "batch_size", "learning_rate", "max_length", "eval_every")
        return {key: self.cleaned_data[key] for key in keys}

    def launch_kwargs(self) -> dict:
        """The arguments run_create and sweep_create share, from the cleaned form."""
        keys = ("project", "name", "base_model", "dataset")
        return {key: self.cleaned_data[key] for key in keys} | {"train_config": self.train_config()}


class RunForm(LaunchForm):
    method = forms.ChoiceField(
        choices=method_choices,
        initial="lora",
        help_text="The parameter-efficient method; its own settings follow.",
    )


class SweepForm(LaunchForm):
    methods = forms.MultipleChoiceField(
        choices=method_choices,
        widget=forms.CheckboxSelectMultiple,
        help_text="Each checked method is trained with its defaults, for every combination "
        "of the values listed below.",
    )
    grid = forms.CharField(
        label="Hyper-parameter lists",
        required=False,
        widget=forms.Textarea(attrs={"rows": 4, "placeholder": "lora.r = 4, 8, 16"}),
        help_text="One line per list: method.field = value, value, … (e.g. lora.r = 4, 8, 16). "
        "Fields not listed keep the method's defaults.",
    )

    def clean_grid(self) -> dict[str, list[str]]:
        try:
            return parse_grid(self.cleaned_data["grid"])
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None


MAX_GRID_LINES = 10
MAX_GRID_VALUES = 10


def parse_grid(text: str) -> dict[str, list[str]]:
    """'lora.r = 4, 8' lines -> {"lora.r": ["4", "8"]}; values are validated per method later."""
    grid: dict[str, list[str]] = {}
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > MAX_GRID_LINES:
        raise ValueError(f"At most {MAX_GRID_LINES} lists.")
    for number, line in enumerate(lines, start=1):
        key, sep, values = line.partition("=")
        method, dot, field = key.strip().partition(".")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not (sep and dot and method and field and items):
            raise ValueError(f"Line {number}: write it as method.field = value, value")
        if len(items) > MAX_GRID_VALUES:
            raise ValueError(f"Line {number}: at most {MAX_GRID_VALUES} values.")
        grid[f"{method}.{field}"] = items
    return grid


class DatasetUploadForm(forms.Form):
    name = forms.CharField(max_length=100)
    team = forms.ModelChoiceField(queryset=None, empty_label=None)
    task = forms.ChoiceField(
        choices=TaskType.choices,
        help_text="Causal LM: columns prompt,completion (or text). Classification: text,label.",
    )
    file = forms.FileField(help_text="CSV with a header row, or JSON Lines (.jsonl).")

    def __init__(self, *args, teams, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["team"].queryset = teams

    def clean_file(self):
        upload = self.cleaned_data["file"]
        if upload.size > settings.DATASET_MAX_BYTES:
            limit_mb = settings.DATASET_MAX_BYTES // (1024 * 1024)
            raise forms.ValidationError(f"The file is larger than {limit_mb} MB.")
        return upload
