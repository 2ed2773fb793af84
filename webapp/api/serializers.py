"""The API's JSON. Output serializers shape models for reading; input serializers check
shapes and types only: the bounds of a launch are the forms' (webapp.api.launch), the rules of
a write the services'."""

import json
import math
import re

from django.core.exceptions import ValidationError as DjangoValidationError
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from peft_core.task_metrics import EVAL_METRICS
from webapp.api.selectors import LATEST_KEYS
from webapp.experiments.downsample import DEFAULT_MAX_POINTS
from webapp.experiments.external import (
    CONFIG_MAX_BYTES,
    CONFIG_MAX_DEPTH,
    FILE_NAME_MAX_CHARS,
    PROFILE_MAX,
    config_check,
    profile_merge,
)
from webapp.experiments.forms import MAX_GRID_LINES, MAX_GRID_VALUES
from webapp.experiments.method_forms import MAX_SEEDS
from webapp.experiments.metrics import MAX_INGEST_POINTS
from webapp.experiments.models import (
    FINISHED_STATUSES,
    Artifact,
    ArtifactKind,
    Dataset,
    PlaygroundPrompt,
    Project,
    Run,
    Sweep,
    TaskType,
)
from webapp.experiments.run_search import (
    MAX_QUERY_CHARS,
    MAX_SORT_CHARS,
    QueryError,
    parse_query,
    parse_sort,
)

MAX_ID = 2**63 - 1  # larger ids would overflow the database's integer, not just miss
METRIC_KEY = r"^[A-Za-z0-9_./-]{1,64}\Z"
GRID_KEY = re.compile(r"^[a-z0-9_]{1,30}\.[a-z0-9_]{1,50}\Z")
MAX_SETTINGS = 50
MAX_SUMMARY_CHARS = 100_000


def _absolute(serializer: serializers.Serializer, url_name: str, pk: int) -> str:
    return serializer.context["request"].build_absolute_uri(reverse(url_name, args=[pk]))


# ---- errors, account, catalogue -------------------------------------------------------------


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()


class TeamRefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()


class ProjectSerializer(serializers.ModelSerializer):
    team = TeamRefSerializer(read_only=True)

    class Meta:
        model = Project
        fields = ["id", "name", "team"]


class ProjectListSerializer(ProjectSerializer):
    """A project with whether the user's role may launch in it (context["launchable"]: ids)."""

    can_launch = serializers.SerializerMethodField()

    class Meta(ProjectSerializer.Meta):
        fields = [*ProjectSerializer.Meta.fields, "can_launch"]

    def get_can_launch(self, project: Project) -> bool:
        return project.id in self.context["launchable"]


class MembershipSerializer(serializers.Serializer):
    id = serializers.IntegerField(source="team.id")
    name = serializers.CharField(source="team.name")
    role = serializers.CharField()


class MeSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField()
    teams = MembershipSerializer(many=True)
    projects = ProjectListSerializer(many=True)


class TokenRequestSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=1000)
    password = serializers.CharField(max_length=4096, trim_whitespace=False)
    name = serializers.CharField(max_length=100, required=False, allow_blank=True, default="api")


class TokenSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    token = serializers.CharField(help_text="Shown this once: only its digest is stored.")


@extend_schema_field(OpenApiTypes.NUMBER)
class NumberField(serializers.Field):
    """A number written as it is (an integer bound stays an integer)."""

    def to_representation(self, value):
        return value


class MethodFieldSerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=["integer", "number", "boolean", "choice", "string"])
    label = serializers.CharField()
    default = serializers.JSONField(allow_null=True)
    min = NumberField(required=False)
    max = NumberField(required=False)
    choices = serializers.ListField(child=serializers.CharField(), required=False)
    max_length = serializers.IntegerField(required=False)
    help = serializers.CharField()


class MethodSerializer(serializers.Serializer):
    key = serializers.CharField()
    title = serializers.CharField()
    summary = serializers.CharField()
    fields = serializers.DictField(child=MethodFieldSerializer())


# ---- datasets --------------------------------------------------------------------------------


class DatasetSerializer(serializers.ModelSerializer):
    """`original_name` is the client's file name as text (its last path part, printable);
    the rows download under a name the server picks."""

    columns = serializers.ListField(child=serializers.CharField(), read_only=True)
    label_names = serializers.ListField(child=serializers.CharField(), read_only=True)
    download_url = serializers.SerializerMethodField()
    train_rows = serializers.SerializerMethodField(help_text="Rows a run trains on.")
    validation_rows = serializers.SerializerMethodField(
        help_text="Rows a run evaluates on: the validation file's (the last rows of the "
        "download), else val_fraction of the rows."
    )
    eval_metrics = serializers.SerializerMethodField(
        help_text="The task metrics a run scores unless its train_config names others."
    )

    class Meta:
        model = Dataset
        fields = ["id", "name", "task", "builtin_key", "team", "row_count", "original_name"]
        fields += ["columns", "label_names", "sha256", "created_at", "download_url"]
        fields += ["train_rows", "validation_rows", "val_fraction", "eval_metrics"]
        read_only_fields = fields

    def get_train_rows(self, dataset: Dataset) -> int:
        return dataset.split_sizes[0]

    def get_validation_rows(self, dataset: Dataset) -> int:
        return dataset.split_sizes[1]

    @extend_schema_field(serializers.ListField(child=serializers.CharField()))
    def get_eval_metrics(self, dataset: Dataset) -> list[str]:
        return dataset.default_eval_metrics

    def get_download_url(self, dataset: Dataset) -> str:
        return _absolute(self, "api-dataset-download", dataset.id)


class DatasetDetailSerializer(DatasetSerializer):
    """Adds the first rows (context["preview"])."""

    preview = serializers.SerializerMethodField()

    class Meta(DatasetSerializer.Meta):
        fields = [*DatasetSerializer.Meta.fields, "preview"]

    @extend_schema_field(serializers.ListField(child=serializers.DictField()))
    def get_preview(self, dataset: Dataset) -> list[dict]:
        return self.context["preview"]


class DatasetUploadSerializer(serializers.Serializer):
    """The multipart body, for the schema: DatasetUploadForm validates it, as on the page."""

    name = serializers.CharField(max_length=100)
    team = serializers.IntegerField()
    task = serializers.ChoiceField(choices=TaskType.choices)
    file = serializers.FileField(help_text="CSV with a header row, or JSON Lines (.jsonl).")
    validation_file = serializers.FileField(
        required=False, help_text="The validation split, in the same columns (optional)."
    )
    val_fraction = serializers.FloatField(
        required=False, help_text="Without a validation file: the share held out, 0.01 to 0.5."
    )
    eval_metrics = serializers.MultipleChoiceField(
        choices=EVAL_METRICS,
        required=False,
        help_text="Default task metrics of its runs (repeat the field, or comma-separated).",
    )


class DatasetRefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()


# ---- runs ------------------------------------------------------------------------------------


class LatestSerializer(serializers.Serializer):
    train_loss = serializers.FloatField(allow_null=True)
    eval_loss = serializers.FloatField(allow_null=True)


class RunSerializer(serializers.ModelSerializer):
    """A run; context: "request" (for the url) and "latest" ({run id: {key: value}})."""

    url = serializers.SerializerMethodField()
    project = ProjectSerializer(read_only=True)
    dataset = DatasetRefSerializer(
        read_only=True, allow_null=True, help_text="null: a run trained elsewhere named none."
    )
    method_config = serializers.DictField(read_only=True)
    train_config = serializers.DictField(read_only=True)
    summary = serializers.DictField(read_only=True)
    profile = serializers.DictField(
        read_only=True,
        help_text="What it costs: trainable_params, total_params, trainable_percent, "
        "adapter_bytes (measured by the worker for a launched run, reported by the script "
        "for one trained elsewhere), and for launched runs memory, throughput and latency; "
        "a key nobody measured is absent.",
    )
    # Recorded at claim: package versions, git sha, GPUs, host, seed, base model and dataset
    # hashes (webapp/experiments/lineage.py); {} until a worker takes the run.
    lineage = serializers.DictField(read_only=True)
    progress = serializers.IntegerField(source="progress_percent", read_only=True)
    tags = serializers.SlugRelatedField(many=True, read_only=True, slug_field="name")
    created_by = serializers.SlugRelatedField(read_only=True, slug_field="username")
    latest = serializers.SerializerMethodField()

    class Meta:
        model = Run
        fields = ["id", "name", "url", "project", "sweep", "base_model", "dataset", "method"]
        fields += ["method_config", "train_config", "status", "step", "total_steps", "progress"]
        fields += ["error", "failure_class", "summary", "profile", "tags", "notes", "external"]
        fields += ["created_by", "created_at", "started_at", "finished_at", "attempt", "latest"]
        fields += ["lineage"]
        fields += ["devices", "gpu_class", "priority"]
        read_only_fields = fields

    def get_url(self, run: Run) -> str:
        return _absolute(self, "run_detail", run.id)

    @extend_schema_field(LatestSerializer)
    def get_latest(self, run: Run) -> dict:
        return self.context["latest"].get(run.id) or dict.fromkeys(LATEST_KEYS)


@extend_schema_field(
    {"oneOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}], "nullable": True}
)
class ScalarField(serializers.Field):
    """A JSON string, finite number or boolean: what one form field can take."""

    default_error_messages = {"invalid": "Give a number, a string or a boolean."}

    def to_internal_value(self, data):
        if isinstance(data, float) and not math.isfinite(data):
            self.fail("invalid")
        if isinstance(data, str) and len(data) > 1000:
            self.fail("invalid")
        if not isinstance(data, bool | int | float | str):
            self.fail("invalid")
        return data

    def to_representation(self, value):
        return value


class GridValueField(ScalarField):
    """One value of a sweep list; it must not break the form's "a = 1, 2" lines."""

    default_error_messages = {
        "invalid": "Give a number, a boolean or a string without , = or newlines."
    }

    def to_internal_value(self, data):
        data = super().to_internal_value(data)
        if isinstance(data, str) and (not data.strip() or set(data) & set(",=\r\n")):
            self.fail("invalid")
        return data


class SettingValueField(ScalarField):
    """A train_config value: a scalar, or a short list of names (eval_metrics)."""

    default_error_messages = {
        "invalid": "Give a number, a string, a boolean or a list of up to 16 short names."
    }

    def to_internal_value(self, data):
        if isinstance(data, list):
            if len(data) > 16 or not all(isinstance(x, str) and 0 < len(x) <= 40 for x in data):
                self.fail("invalid")
            return data
        return super().to_internal_value(data)


def _settings_field(
    help_text: str, child: type[ScalarField] = ScalarField
) -> serializers.DictField:
    return serializers.DictField(
        child=child(allow_null=True), required=False, default=dict, help_text=help_text
    )


class LaunchSerializer(serializers.Serializer):
    """What a run and a sweep share."""

    name = serializers.CharField(max_length=120, required=False, allow_blank=True)
    project = serializers.IntegerField(
        min_value=1,
        max_value=MAX_ID,
        required=False,
        allow_null=True,
        help_text="Default: the first project where you may launch.",
    )
    base_model = serializers.CharField(max_length=100, help_text="A key of GET /models/.")
    dataset = serializers.IntegerField(min_value=1, max_value=MAX_ID)
    train_config = _settings_field(
        "steps, batch_size, learning_rate, max_length, eval_every, eval_metrics (a list of "
        'names, or "exact_match,rouge_l"; "dataset" for the dataset\'s defaults, the default; '
        "[] for the loss alone), eval_batches, max_new_tokens, …; a missing one takes the "
        "launch form's default.",
        SettingValueField,
    )
    # Bounds are the launch form's (one judge); these only take the JSON types.
    devices = serializers.IntegerField(
        required=False, help_text="GPUs of one data-parallel run, 1 to 8 (default 1)."
    )
    gpu_class = serializers.CharField(
        max_length=40,
        required=False,
        help_text='The GPU class a worker advertises, e.g. "a100", or "any" (the default).',
    )
    priority = serializers.IntegerField(
        required=False,
        help_text="-10 to 10 (default 0): higher first among your team's waiting runs.",
    )

    def validate_train_config(self, value: dict) -> dict:
        return _bounded(value)


class RunCreateSerializer(LaunchSerializer):
    method = serializers.CharField(max_length=30, help_text="A key of GET /methods/.")
    method_config = _settings_field("The method's fields (GET /methods/); others take defaults.")
    external = serializers.BooleanField(
        default=False,
        help_text="Trained elsewhere: the run starts as running, takes metrics through "
        "POST metrics/ and ends with POST finish/.",
    )

    def validate_method_config(self, value: dict) -> dict:
        return _bounded(value)


class ProfileSchemaSerializer(serializers.Serializer):
    """For the schema: what a script may report of its run's size (external.PROFILE_KEYS)."""

    trainable_params = serializers.IntegerField(
        min_value=0, max_value=PROFILE_MAX, required=False, help_text="Parameters trained."
    )
    total_params = serializers.IntegerField(
        min_value=0, max_value=PROFILE_MAX, required=False, help_text="Parameters in all."
    )
    adapter_bytes = serializers.IntegerField(
        min_value=0,
        max_value=PROFILE_MAX,
        required=False,
        help_text="The saved adapter's size; an adapter uploaded to the run sets it.",
    )


@extend_schema_field(ProfileSchemaSerializer)
class ProfileField(serializers.DictField):
    """The numbers a script reports, judged by external.profile_merge: only its keys, each a
    non-negative integer (JSON true or "5" are refused), trainable_params ≤ total_params."""

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        try:
            profile_merge({}, value)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from None
        return value


@extend_schema_field({"type": "object", "additionalProperties": True})
class ConfigField(serializers.DictField):
    """Any JSON object within external.config_check's bounds."""

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        try:
            return config_check(value, label=self.field_name)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from None


def _summary_check(value: dict) -> dict:
    if len(json.dumps(value)) > MAX_SUMMARY_CHARS:
        raise serializers.ValidationError(f"At most {MAX_SUMMARY_CHARS:,} characters of JSON.")
    return value


class ExternalRunCreateSerializer(serializers.Serializer):
    """A run trained elsewhere, free form: no worker takes it, the script feeds its metrics
    (POST metrics/), may upload files (POST artifacts/) and ends it (POST finish/)."""

    external = serializers.BooleanField(help_text="true: a run trained elsewhere.")
    project = serializers.IntegerField(
        min_value=1,
        max_value=MAX_ID,
        required=False,
        allow_null=True,
        help_text="Default: the first project where you may launch.",
    )
    name = serializers.CharField(
        max_length=120,
        required=False,
        allow_blank=True,
        help_text='Default: "<method> on <base_model>".',
    )
    base_model = serializers.CharField(
        max_length=200,
        help_text="Any name. One that refers to a ready model of the project's team or a "
        "bundled one (its name, a bundled model's Hub id, a registered model's Hub id, "
        "id@revision or directory) is linked to it, and the run records the registry's name; "
        "any other is kept as given.",
    )
    method = serializers.CharField(
        max_length=60,
        help_text='Any name, e.g. "full", "lora", "qlora", "galore". One of GET /methods/ '
        "keeps PEFT Lab's meaning (title, mergeable).",
    )
    method_config = ConfigField(
        required=False,
        default=dict,
        help_text=f"Any JSON object: at most {CONFIG_MAX_BYTES:,} bytes serialised, "
        f"{CONFIG_MAX_DEPTH} levels deep.",
    )
    train_config = ConfigField(
        required=False,
        default=dict,
        help_text="As method_config. `steps` (or a positive `max_steps`) is the run's total "
        "steps for its progress bar.",
    )
    dataset = serializers.IntegerField(
        min_value=1,
        max_value=MAX_ID,
        required=False,
        allow_null=True,
        help_text="A dataset of the project's team or a built-in one; omitted or null: none.",
    )
    tags = serializers.ListField(
        child=serializers.CharField(max_length=50),
        max_length=20,
        required=False,
        default=list,
        help_text="Up to 20 tags of 1 to 50 characters.",
    )
    summary = serializers.DictField(
        required=False,
        default=dict,
        help_text=f'Final numbers so far, e.g. {{"eval_loss": 0.9}}; at most '
        f"{MAX_SUMMARY_CHARS:,} characters of JSON. finish/ may replace it.",
    )
    profile = ProfileField(
        required=False,
        default=dict,
        help_text="The run's size for the trade-off table and compare page; finish/ may add to it.",
    )

    def validate_external(self, value: bool) -> bool:
        if not value:
            raise serializers.ValidationError("This body is for external runs only.")
        return value

    def validate_summary(self, value: dict) -> dict:
        return _summary_check(value)


class SweepCreateSerializer(LaunchSerializer):
    methods = serializers.ListField(
        child=serializers.CharField(max_length=30), min_length=1, max_length=20
    )
    grid = serializers.DictField(
        child=serializers.ListField(
            child=GridValueField(), min_length=1, max_length=MAX_GRID_VALUES
        ),
        required=False,
        default=dict,
        help_text='Lists per method field, e.g. {"lora.r": [4, 8]}: one run per combination.',
    )
    seeds = serializers.IntegerField(
        min_value=1,
        max_value=MAX_SEEDS,
        required=False,
        default=1,
        help_text="Runs per configuration, with train seeds seed, seed + 1, …; the compare page "
        "shows their mean ± 95 % interval. Each is a run (and counts as one in the quotas).",
    )

    def validate_grid(self, value: dict) -> dict:
        if len(value) > MAX_GRID_LINES:
            raise serializers.ValidationError(f"At most {MAX_GRID_LINES} lists.")
        for key in value:
            if not GRID_KEY.match(key):
                raise serializers.ValidationError(f"{key[:80]}: write keys as method.field.")
        return value


def _bounded(value: dict) -> dict:
    if len(value) > MAX_SETTINGS:
        raise serializers.ValidationError(f"At most {MAX_SETTINGS} settings.")
    return value


class RunFilterSerializer(serializers.Serializer):
    """The run list's query parameters (the runs page takes the same)."""

    method = serializers.CharField(max_length=100, required=False, default="")
    base_model = serializers.CharField(max_length=100, required=False, default="")
    dataset = serializers.IntegerField(min_value=1, max_value=MAX_ID, required=False)
    status = serializers.CharField(max_length=100, required=False, default="")
    tag = serializers.CharField(max_length=100, required=False, default="")
    q = serializers.CharField(
        max_length=MAX_QUERY_CHARS,
        required=False,
        default="",
        trim_whitespace=False,
        help_text="Terms a run must all match, separated by spaces: key op value with op one "
        "of = != < <= > >= (eval_loss<1.2, config.lora.r=8, method=lora, status=succeeded, "
        "tag=best), or words of the run's name. Keys: the run's fields, config.<path>, or a "
        "number of its summary. The runs page explains the language in full.",
    )
    sweep = serializers.IntegerField(min_value=1, max_value=MAX_ID, required=False)
    sort = serializers.CharField(
        max_length=MAX_SORT_CHARS,
        required=False,
        default="newest",
        help_text="newest (default), oldest, or a field (name, method, model, status, created, "
        "id, step, total_steps), config.<path> or a summary metric; a leading - for "
        "descending: -eval_exact_match. Runs without the value come last.",
    )

    def validate_q(self, value: str) -> str:
        try:
            parse_query(value)
        except QueryError as exc:
            raise serializers.ValidationError(str(exc)) from None
        return value

    def validate_sort(self, value: str) -> str:
        try:
            parse_sort(value)
        except QueryError as exc:
            raise serializers.ValidationError(str(exc)) from None
        return value

    def filters(self) -> dict:
        """The validated parameters as selectors.run_filter_for_user's arguments."""
        data = self.validated_data
        return {
            "method": data["method"],
            "base_model": data["base_model"],
            "dataset_id": data.get("dataset"),
            "status": data["status"],
            "tag": data["tag"],
            "query": data["q"],
            "sweep_id": data.get("sweep"),
            "sort": data["sort"],
        }


# ---- metrics, finishing, artifacts -----------------------------------------------------------


class MetricsQuerySerializer(serializers.Serializer):
    keys = serializers.CharField(
        max_length=2000,
        required=False,
        default="",
        help_text="Comma-separated metric keys; default: the run's keys a page at a time "
        "(PEFTLAB_METRIC_KEYS_PER_PAGE of them, in order; next_cursor names the next page).",
    )
    cursor = serializers.CharField(
        max_length=64,
        required=False,
        default="",
        trim_whitespace=False,
        help_text="Without keys: the next_cursor of the page before; default: the first page.",
    )
    max_points = serializers.IntegerField(
        min_value=10,
        max_value=10_000,
        default=DEFAULT_MAX_POINTS,
        help_text="Each series is min/max-downsampled to about this many points.",
    )

    def validate_keys(self, value: str) -> tuple[str, ...]:
        keys = tuple(dict.fromkeys(key.strip() for key in value.split(",") if key.strip()))
        bad = [key for key in keys if not re.match(METRIC_KEY, key)]
        if bad:
            raise serializers.ValidationError(f"Not a metric key: {bad[0][:80]}")
        return keys

    def validate(self, data: dict) -> dict:
        if data["keys"] and data["cursor"]:
            raise serializers.ValidationError(
                {
                    "cursor": "A cursor pages through the run's keys; with keys named it means nothing."
                }
            )
        return data


class SeriesSerializer(serializers.Serializer):
    step = serializers.ListField(child=serializers.IntegerField())
    value = serializers.ListField(child=serializers.FloatField())


class MetricsSerializer(serializers.Serializer):
    series = serializers.DictField(child=SeriesSerializer())
    next_cursor = serializers.CharField(
        allow_null=True,
        help_text="Without keys: pass it as cursor for the next page of keys; null on the last "
        "page (and whenever keys are named).",
    )


class FiniteFloatField(serializers.FloatField):
    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if not math.isfinite(value):
            self.fail("invalid")
        return value


class MetricPointSerializer(serializers.Serializer):
    key = serializers.RegexField(METRIC_KEY, help_text="1-64 of A-Z a-z 0-9 _ . / -")
    step = serializers.IntegerField(min_value=0, max_value=2**31 - 1)
    value = FiniteFloatField()
    wall_time = FiniteFloatField(min_value=0, default=0.0, help_text="Seconds since the start.")


class MetricsIngestSerializer(serializers.Serializer):
    points = MetricPointSerializer(many=True, max_length=MAX_INGEST_POINTS)


class IngestResultSerializer(serializers.Serializer):
    received = serializers.IntegerField()


class FinishSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=[status.value for status in FINISHED_STATUSES])
    summary = serializers.DictField(required=False, help_text="Replaces the run's summary.")
    profile = ProfileField(
        required=False,
        help_text="Joins the numbers reported when the run was created.",
    )

    def validate_summary(self, value: dict) -> dict:
        return _summary_check(value)


class VersionQuerySerializer(serializers.Serializer):
    version = serializers.IntegerField(min_value=1, max_value=2**31 - 1, required=False)


class ArtifactQuerySerializer(VersionQuerySerializer):
    kind = serializers.ChoiceField(choices=ArtifactKind.choices, required=False)


class ArtifactUploadSerializer(serializers.Serializer):
    """The multipart body of POST runs/<id>/artifacts/ (a run trained elsewhere)."""

    kind = serializers.ChoiceField(
        choices=[ArtifactKind.ADAPTER.value, ArtifactKind.FILE.value],
        help_text="adapter: config_file + weights_file, checked as an uploaded adapter is and "
        "stored as the run's next adapter version; file: any file.",
    )
    config_file = serializers.FileField(
        required=False, help_text="kind=adapter: adapter_config.json (HF PEFT's)."
    )
    weights_file = serializers.FileField(
        required=False,
        help_text="kind=adapter: adapter_model.safetensors (safetensors only, never pickle).",
    )
    file = serializers.FileField(
        required=False,
        allow_empty_file=True,
        help_text="kind=file: the file, up to PEFTLAB_RUN_FILE_MAX_BYTES (2 GiB by default).",
    )
    name = serializers.CharField(
        required=False,
        allow_blank=True,
        trim_whitespace=False,
        max_length=FILE_NAME_MAX_CHARS,
        help_text="kind=file: the name it is kept under (a plain file name, no path parts); "
        "default: the uploaded file's name. Each upload of a name is a new version.",
    )
    sha256 = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=64,
        help_text="kind=file: the file's sha256 in hex; a file that does not hash to it is "
        "refused (400) and not kept.",
    )

    def validate(self, data: dict) -> dict:
        needed = ("config_file", "weights_file") if data["kind"] == "adapter" else ("file",)
        missing = {key: ["Required for this kind."] for key in needed if not data.get(key)}
        if missing:
            raise serializers.ValidationError(missing)
        return data


class ArtifactSerializer(serializers.ModelSerializer):
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = Artifact
        fields = [
            "id",
            "kind",
            "name",
            "version",
            "size",
            "sha256",
            "home",
            "created_at",
            "checked_at",
            "damaged",
            "download_url",
        ]
        read_only_fields = fields

    def get_download_url(self, artifact: Artifact) -> str:
        return _absolute(self, "api-artifact-download", artifact.id)


# ---- sweeps ----------------------------------------------------------------------------------


class SweepSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    project = ProjectSerializer(read_only=True)
    dataset = DatasetRefSerializer(read_only=True)
    grid = serializers.DictField(read_only=True)

    class Meta:
        model = Sweep
        fields = ["id", "name", "url", "project", "base_model", "dataset", "grid", "created_at"]
        read_only_fields = fields

    def get_url(self, sweep: Sweep) -> str:
        return _absolute(self, "sweep_detail", sweep.id)


class SweepDetailSerializer(SweepSerializer):
    """Adds the sweep's runs (context["runs"], with "latest" for them)."""

    runs = serializers.SerializerMethodField()

    class Meta(SweepSerializer.Meta):
        fields = [*SweepSerializer.Meta.fields, "runs"]

    @extend_schema_field(RunSerializer(many=True))
    def get_runs(self, sweep: Sweep) -> list:
        return RunSerializer(self.context["runs"], many=True, context=self.context).data


class PlaygroundRequestSerializer(serializers.Serializer):
    runs = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=MAX_ID), min_length=1, max_length=4
    )
    text = serializers.CharField(max_length=2000, trim_whitespace=False)


class PlaygroundPromptSerializer(serializers.ModelSerializer):
    runs = serializers.PrimaryKeyRelatedField(many=True, read_only=True)
    url = serializers.SerializerMethodField()
    answers = serializers.DictField(read_only=True)

    class Meta:
        model = PlaygroundPrompt
        fields = ["id", "url", "base_model", "task", "text", "runs", "status", "answers"]
        fields += ["error", "created_at", "finished_at"]
        read_only_fields = fields

    def get_url(self, prompt) -> str:
        return self.context["request"].build_absolute_uri(
            reverse("playground_prompt", args=[prompt.id])
        )
