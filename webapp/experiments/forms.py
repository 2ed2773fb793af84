"""Forms validate bounds and shapes; the services do the writes."""

from django import forms
from django.conf import settings
from django.template.defaultfilters import filesizeformat

from peft_core.catalogue import CATALOGUE
from peft_core.checks import ConfigError, config_field
from peft_core.configs import (
    TrainConfig,
    eval_metric_names,
    refuse_eval_metrics,
    refuse_fsdp,
    refuse_packing,
    refuse_quantized,
)
from peft_core.task_metrics import EVAL_METRIC_CHOICES
from webapp.experiments.method_forms import MAX_SEEDS, method_choices, settings_field
from webapp.experiments.models import TaskType
from webapp.experiments.queue import ANY_CLASS, GPU_CLASS_PATTERN, MAX_DEVICES
from webapp.experiments.services import VAL_FRACTION_BOUNDS
from webapp.registry.selectors import launch_model_choices, model_for_team

ADVANCED_TRAINING = (
    "schedule", "warmup_steps", "grad_accum", "gradient_checkpointing", "precision",
    "quantize", "attn", "packing", "grad_clip", "early_stop_patience", "seed", "parallel",
    "measure", "eval_batches", "max_new_tokens",
)  # fmt: skip
DATASET_METRICS = "dataset"  # the launch form's choice of the dataset's default task metrics


PLACEMENT_DEFAULTS = {"devices": 1, "gpu_class": ANY_CLASS, "priority": 0}


def model_choices() -> list[tuple[str, str]]:
    return [(spec.key, spec.title) for spec in CATALOGUE.values()]


class EvalMetricsField(forms.MultipleChoiceField):
    """Task metrics (TrainConfig.eval_metrics) as check boxes; a client may post them as one
    comma-separated value too ("exact_match,rouge_l")."""

    widget = forms.CheckboxSelectMultiple

    def __init__(self, *, extra_choices: tuple = (), **kwargs):
        kwargs.setdefault("required", False)
        super().__init__(choices=[*extra_choices, *EVAL_METRIC_CHOICES], **kwargs)

    def to_python(self, value):
        values = [value] if isinstance(value, str) else list(value or ())
        names = [name.strip() for text in values for name in str(text).split(",")]
        return super().to_python([name for name in names if name])


class LaunchForm(forms.Form):
    """What a run and a sweep share: where, on what, and how long to train."""

    name = forms.CharField(
        max_length=120,
        help_text="A name, shown in lists and charts.",
    )
    project = forms.ModelChoiceField(
        queryset=None,
        empty_label=None,
        help_text="Where the run is filed; everyone in the project's team can see it.",
    )
    base_model = forms.ChoiceField(
        label="Base model",
        choices=model_choices,
        help_text="The frozen model the adapter is trained on: a bundled one, or one your "
        "team registered (Models).",
    )
    dataset = forms.ModelChoiceField(
        queryset=None,
        empty_label=None,
        help_text="What the model learns from. Built-in samples need no upload; a "
        "classification dataset gets a classifier head, trained with the adapter.",
    )
    steps = forms.IntegerField(
        min_value=1,
        max_value=100_000,
        initial=30,
        help_text="Optimizer steps. 30 is enough to see the loss fall on the built-in samples.",
    )
    batch_size = forms.IntegerField(
        min_value=1,
        max_value=256,
        initial=4,
        help_text="Examples per optimizer step. Larger batches give steadier steps and need "
        "more memory.",
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
        help_text="Tokens per example; longer examples are truncated. Memory and time grow "
        "with it.",
    )
    eval_every = forms.IntegerField(
        min_value=0,
        max_value=100_000,
        initial=10,
        help_text="Evaluate on the validation split every N steps (0: only at the end).",
    )
    eval_metrics = EvalMetricsField(
        label="Task metrics",
        extra_choices=((DATASET_METRICS, "The dataset's defaults (shown on its page)"),),
        initial=[DATASET_METRICS],
        help_text="Scored beside the loss for the base model before training and at every "
        "evaluation, so the run shows base → trained. Classification: accuracy, macro-F1. "
        "Generation (prompt,completion rows): on greedy answers to the first eval batches × "
        "batch size validation prompts, at most max new tokens each (Advanced); this costs "
        "time on a CPU. None ticked: the loss alone.",
    )
    checkpoint_every = forms.IntegerField(
        label="Checkpoint every",
        min_value=0,
        max_value=100_000,
        initial=0,
        required=False,
        help_text="Steps between checkpoints (adapter, optimizer, RNG) that a run resumes "
        "from if its worker dies. 0: the server's default.",
    )

    # The advanced training settings: TrainConfig's own fields (label, help, default, bounds).
    schedule = settings_field(TrainConfig, "schedule")
    warmup_steps = settings_field(TrainConfig, "warmup_steps")
    grad_accum = settings_field(TrainConfig, "grad_accum")
    gradient_checkpointing = settings_field(TrainConfig, "gradient_checkpointing")
    precision = settings_field(TrainConfig, "precision")
    quantize = settings_field(TrainConfig, "quantize")
    attn = settings_field(TrainConfig, "attn")
    packing = settings_field(TrainConfig, "packing")
    grad_clip = settings_field(TrainConfig, "grad_clip")
    early_stop_patience = settings_field(TrainConfig, "early_stop_patience")
    seed = settings_field(TrainConfig, "seed")
    parallel = settings_field(TrainConfig, "parallel")
    eval_batches = settings_field(TrainConfig, "eval_batches")
    max_new_tokens = settings_field(TrainConfig, "max_new_tokens")
    measure = settings_field(TrainConfig, "measure")

    # Where it runs (Advanced): the worker's queue is a function of these (queue.run_queue).
    devices = forms.IntegerField(
        min_value=1,
        max_value=MAX_DEVICES,
        initial=1,
        required=False,
        help_text="GPUs of one data-parallel run (torchrun, one process each); a worker with "
        "at least this many takes it.",
    )
    gpu_class = forms.RegexField(
        label="GPU class",
        regex=rf"^(?:{GPU_CLASS_PATTERN})$",
        max_length=40,
        initial=ANY_CLASS,
        required=False,
        error_messages={"invalid": "Lower-case letters, digits and dashes (e.g. a100), or any."},
        help_text="The class of GPU it needs, as the workers advertise it (e.g. a100), or any.",
    )
    priority = forms.IntegerField(
        min_value=-10,
        max_value=10,
        initial=0,
        required=False,
        help_text="Higher goes first among your team's waiting runs (-10 to 10); between "
        "teams the order stays fair.",
    )

    def __init__(self, *args, projects, datasets, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["project"].queryset = projects
        self.fields["dataset"].queryset = datasets
        for key in ADVANCED_TRAINING:  # left out (an older client, a folded section): default
            self.fields[key].required = False
        # The bundled models, then the ready models of the teams these projects belong to.
        self.fields["base_model"].choices = launch_model_choices(
            projects.values_list("team_id", flat=True)
        )

    def _check_model(self, cleaned: dict) -> dict:
        name, dataset, project = (cleaned.get(k) for k in ("base_model", "dataset", "project"))
        if not (name and project):
            return cleaned
        model = model_for_team(team=project.team, name=name)
        if model is None or not model.is_ready:
            self.add_error("base_model", f"{name} is not a ready model of {project.team.name}.")
        elif dataset and dataset.task not in model.tasks:
            tasks = ", ".join(model.tasks)
            self.add_error(
                "dataset",
                f"{model.title or name} supports {tasks}; this dataset is {dataset.task}.",
            )
        return cleaned

    def clean(self):
        cleaned = self._check_model(super().clean())
        if not self.errors:  # TrainConfig judges the complete settings, as for a method
            try:
                config = TrainConfig(**self.train_config())
                dataset = cleaned["dataset"]
                refuse_eval_metrics(
                    config.eval_metrics, task=dataset.task, columns=dataset.columns or None
                )
                refuse_packing(config.packing, task=cleaned["dataset"].task)
                devices = cleaned.get("devices") or PLACEMENT_DEFAULTS["devices"]
                for method in self.launched_methods(cleaned):
                    refuse_fsdp(
                        config.parallel, method=method, quantize=config.quantize, devices=devices
                    )
            except ConfigError as error:
                self.add_error(error.field if error.field in self.fields else None, str(error))
        return cleaned

    def launched_methods(self, cleaned: dict) -> list[str]:
        """The methods this form launches (a run's one, a sweep's several)."""
        return []

    def train_config(self) -> dict:
        """The run's TrainConfig fields; an advanced setting left at its default is left out,
        but for the seed."""
        keys = ("steps", "batch_size", "learning_rate", "max_length", "eval_every")
        config = {key: self.cleaned_data[key] for key in keys}
        if self.cleaned_data.get("checkpoint_every"):
            config["checkpoint_every"] = self.cleaned_data["checkpoint_every"]
        for key in ADVANCED_TRAINING:
            value = self.cleaned_data.get(key)
            if value not in (None, "") and value != config_field(TrainConfig, key).default:
                config[key] = value
        config.setdefault("seed", TrainConfig.seed)  # always on the run, and on its page
        metrics = self.eval_metric_names()
        if metrics:
            config["eval_metrics"] = metrics
        return config

    def eval_metric_names(self) -> list[str]:
        """The ticked task metrics, the dataset's defaults in place of their box."""
        names = list(self.cleaned_data.get("eval_metrics") or ())
        dataset = self.cleaned_data.get("dataset")
        if DATASET_METRICS in names:
            names.remove(DATASET_METRICS)
            names += dataset.default_eval_metrics if dataset else []
        return list(eval_metric_names(names))  # each once, in their order

    def launch_kwargs(self) -> dict:
        """The arguments run_create and sweep_create share, from the cleaned form."""
        keys = ("project", "name", "base_model", "dataset")
        return {key: self.cleaned_data[key] for key in keys} | {"train_config": self.train_config()}

    def placement(self) -> dict:
        """Where its runs go: devices, GPU class and priority (a field left out: its default)."""
        return {
            key: default if self.cleaned_data.get(key) in (None, "") else self.cleaned_data[key]
            for key, default in PLACEMENT_DEFAULTS.items()
        }


class RunForm(LaunchForm):
    method = forms.ChoiceField(
        choices=method_choices,
        initial="lora",
        help_text="The parameter-efficient method: the base model stays frozen and only a "
        "small add-on is trained. Its own settings follow.",
    )

    def launched_methods(self, cleaned: dict) -> list[str]:
        return [cleaned["method"]] if cleaned.get("method") else []

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("method") and not self.errors:
            train = self.train_config()
            try:
                refuse_quantized(cleaned["method"], train.get("quantize", "none"))
                refuse_packing(train.get("packing", False), method=cleaned["method"])
            except ConfigError as error:
                self.add_error(error.field, str(error))
        return cleaned


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
        help_text="One line per list: method.field = value, value, … (e.g. lora.r = 4, 8, 16); "
        "train.field varies a training setting for every method (e.g. train.schedule = "
        "linear, cosine, or train.learning_rate = 1e-4, 3e-4). Fields not listed keep the "
        "defaults.",
    )

    seeds = forms.IntegerField(
        label="Seeds",
        min_value=1,
        max_value=MAX_SEEDS,
        initial=1,
        required=False,
        help_text="Train each configuration this many times, with seeds seed, seed + 1, …: "
        "the compare page then shows each metric as a mean ± 95 % interval and says which "
        f"configurations it cannot tell apart. Each seed is a run; at most {MAX_SEEDS}.",
    )

    def launched_methods(self, cleaned: dict) -> list[str]:
        return list(cleaned.get("methods") or ())

    def clean_grid(self) -> dict[str, list[str]]:
        try:
            return parse_grid(self.cleaned_data["grid"])
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean_seeds(self) -> int:
        return self.cleaned_data.get("seeds") or 1

    def launch_kwargs(self) -> dict:
        return super().launch_kwargs() | {"seeds": self.cleaned_data["seeds"]}


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


UPLOAD_FORM_OVERHEAD_BYTES = 64 * 1024  # the other fields and the multipart boundaries


def size_text(size: int) -> str:
    """A byte count as people read a limit: "2 GiB", "20 MiB", "1,024 bytes"."""
    for unit, name in ((1024**3, "GiB"), (1024**2, "MiB")):
        if size >= unit:
            return f"{size / unit:.3g} {name}"
    return f"{size:,} bytes"


class DatasetUploadForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="A name, shown on the launch form.")
    team = forms.ModelChoiceField(
        queryset=None, empty_label=None, help_text="The team that can see and train on it."
    )
    task = forms.ChoiceField(
        choices=TaskType.choices,
        help_text="Causal LM: columns prompt,completion (or text). Classification: text,label.",
    )
    file = forms.FileField(help_text="CSV with a header row, or JSON Lines.")  # + the cap
    validation_file = forms.FileField(
        label="Validation file",
        required=False,
        help_text="Optional: the rows to evaluate on, in the same columns (CSV or JSON Lines). "
        "Without it, a share of the file is held out.",
    )
    val_fraction = forms.FloatField(
        label="Validation share",
        min_value=VAL_FRACTION_BOUNDS[0],
        max_value=VAL_FRACTION_BOUNDS[1],
        initial=0.1,
        required=False,
        help_text="Without a validation file: the share of the rows held out for validation "
        "(0.01 to 0.5), drawn at random once.",
    )
    eval_metrics = EvalMetricsField(
        label="Default task metrics",
        help_text="Scored beside the loss for the base model and at every evaluation of a run "
        "on this dataset, unless its launch chooses others. Classification: accuracy, "
        "macro-F1. Generation (prompt,completion rows): on greedy answers to the validation "
        "prompts.",
    )

    def __init__(self, *args, teams, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["team"].queryset = teams
        limit = size_text(settings.DATASET_MAX_BYTES)
        self.fields["file"].help_text = f"CSV with a header row, or JSON Lines; at most {limit}."

    def clean_file(self):
        upload = self.cleaned_data["file"]
        if upload.size > settings.DATASET_MAX_BYTES:
            raise forms.ValidationError(self.too_large_message())
        return upload

    def clean(self):
        cleaned = super().clean()
        upload, validation = cleaned.get("file"), cleaned.get("validation_file")
        if upload and validation and upload.size + validation.size > settings.DATASET_MAX_BYTES:
            limit = size_text(settings.DATASET_MAX_BYTES)
            self.add_error("validation_file", f"The two files together are larger than {limit}.")
        if cleaned.get("val_fraction") is None:
            cleaned["val_fraction"] = self.fields["val_fraction"].initial
        return cleaned

    def upload_kwargs(self) -> dict:
        """services.dataset_upload_create's arguments but the user's, from the cleaned form."""
        data = self.cleaned_data
        validation = data.get("validation_file")
        return {
            "team": data["team"],
            "name": data["name"],
            "filename": data["file"].name,
            "data": data["file"],
            "task": data["task"],
            "validation": (validation.name, validation) if validation else None,
            "val_fraction": data["val_fraction"],
            "eval_metrics": data["eval_metrics"],
        }

    @staticmethod
    def too_large_message() -> str:
        limit = size_text(settings.DATASET_MAX_BYTES)
        return f"The file is larger than {limit}, the limit for a dataset."

    @staticmethod
    def max_body_bytes() -> int:
        """The largest request body that can hold an acceptable upload."""
        return settings.DATASET_MAX_BYTES + UPLOAD_FORM_OVERHEAD_BYTES

    @classmethod
    def body_too_large(cls, request) -> bool:
        """Whether the declared body cannot hold an acceptable upload. Asked before anything
        parses the body: Django reads no more than Content-Length, so a bigger file is refused
        unread; an accepted one past FILE_UPLOAD_MAX_MEMORY_SIZE waits in a temporary file."""
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return False  # Django then reads no body at all
        return length > cls.max_body_bytes()


def upload_model_choices() -> list[tuple[str, str]]:
    return [("", "As adapter_config.json names it"), *model_choices()]


class AdapterUploadForm(forms.Form):
    """An adapter trained elsewhere (HF PEFT layout), to compare, download and share."""

    name = forms.CharField(max_length=120, help_text="A name, shown in lists and charts.")
    project = forms.ModelChoiceField(
        queryset=None,
        empty_label=None,
        help_text="Where the adapter is filed, beside the runs it is compared with.",
    )
    base_model = forms.ChoiceField(
        label="Base model",
        choices=upload_model_choices,
        required=False,
        help_text="The model it was trained on (bundled, or registered by your team); by "
        "default the one the config's base_model_name_or_path names.",
    )
    dataset = forms.ModelChoiceField(
        queryset=None,
        required=False,
        empty_label="The built-in sample of its task",
        help_text="The dataset shown with the run (and used to evaluate it).",
    )
    config = forms.FileField(label="adapter_config.json", help_text="At most 256 KiB.")
    weights = forms.FileField(
        label="adapter_model.safetensors",
        help_text="Safetensors only: pickled .bin or .pt files are refused.",
    )

    def __init__(self, *args, projects, datasets, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["project"].queryset = projects
        self.fields["dataset"].queryset = datasets
        team_ids = projects.values_list("team_id", flat=True)
        self.fields["base_model"].choices = [
            ("", "As adapter_config.json names it"),
            *launch_model_choices(team_ids),
        ]

    def clean_weights(self):
        upload = self.cleaned_data["weights"]
        if upload.size > settings.ADAPTER_MAX_BYTES:
            limit = filesizeformat(settings.ADAPTER_MAX_BYTES)
            raise forms.ValidationError(f"The file is larger than {limit}.")
        return upload

    def upload_kwargs(self) -> dict:
        """The arguments of services.adapter_upload_create, from the cleaned form."""
        keys = ("project", "name", "base_model", "dataset")
        data = self.cleaned_data
        return {key: data[key] for key in keys} | {
            "config_file": data["config"],
            "weights_file": data["weights"],
        }


class PlaygroundForm(forms.Form):
    runs = forms.ModelMultipleChoiceField(
        queryset=None,
        widget=forms.CheckboxSelectMultiple,
        help_text="Up to 4 succeeded runs on one base model; the base model answers too.",
    )
    text = forms.CharField(
        label="Prompt",
        max_length=2000,
        widget=forms.Textarea(attrs={"rows": 3, "placeholder": "Put in alphabetical order: …"}),
        help_text="A prompt for a causal LM, or a sentence to classify for a classifier.",
    )

    def __init__(self, *args, runs, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["runs"].queryset = runs
        self.fields["runs"].label_from_instance = lambda run: (
            f"{run.name} · {run.method} on {run.base_model}"
        )
