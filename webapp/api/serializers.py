"""The API's JSON. Output serializers shape models for reading; input serializers check
shapes and types only: the bounds of a launch are the forms' (webapp.api.launch), the rules of
a write the services'."""

import json
import math
import re

from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from webapp.api.selectors import LATEST_KEYS
from webapp.experiments.downsample import DEFAULT_MAX_POINTS
from webapp.experiments.forms import MAX_GRID_LINES, MAX_GRID_VALUES
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
from webapp.experiments.selectors import RUN_SORTS

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

    class Meta:
        model = Dataset
        fields = ["id", "name", "task", "builtin_key", "team", "row_count", "original_name"]
        fields += ["columns", "label_names", "sha256", "created_at", "download_url"]
        read_only_fields = fields

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
    dataset = DatasetRefSerializer(read_only=True)
    method_config = serializers.DictField(read_only=True)
    train_config = serializers.DictField(read_only=True)
    summary = serializers.DictField(read_only=True)
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
        fields += ["error", "failure_class", "summary", "tags", "notes", "external"]
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


def _settings_field(help_text: str) -> serializers.DictField:
    return serializers.DictField(
        child=ScalarField(allow_null=True), required=False, default=dict, help_text=help_text
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
        "steps, batch_size, learning_rate, max_length, eval_every; a missing one takes the "
        "launch form's default."
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
        max_length=100, required=False, default="", help_text="Part of the run's name."
    )
    sweep = serializers.IntegerField(min_value=1, max_value=MAX_ID, required=False)
    sort = serializers.ChoiceField(choices=list(RUN_SORTS), required=False, default="newest")

    def filters(self) -> dict:
        """The validated parameters as selectors.run_filter_for_user's arguments."""
        data = self.validated_data
        return {
            "method": data["method"],
            "base_model": data["base_model"],
            "dataset_id": data.get("dataset"),
            "status": data["status"],
            "tag": data["tag"],
            "search": data["q"],
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
    summary = serializers.DictField(required=False)

    def validate_summary(self, value: dict) -> dict:
        if len(json.dumps(value)) > MAX_SUMMARY_CHARS:
            raise serializers.ValidationError(f"At most {MAX_SUMMARY_CHARS:,} characters of JSON.")
        return value


class VersionQuerySerializer(serializers.Serializer):
    version = serializers.IntegerField(min_value=1, max_value=2**31 - 1, required=False)


class ArtifactQuerySerializer(VersionQuerySerializer):
    kind = serializers.ChoiceField(choices=ArtifactKind.choices, required=False)


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
