"""/api/v1/: thin classes. Selectors read (another team's id is 404), services write, the
browser's forms validate launches (webapp.api.launch); errors.service_errors maps what the
services raise onto 403, 400 and 409."""

from django.conf import settings
from django.contrib.auth import authenticate
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import StreamingHttpResponse
from django.utils.http import content_disposition_header
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
    inline_serializer,
)
from rest_framework import generics, serializers, status
from rest_framework.exceptions import NotFound, Throttled, ValidationError
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from webapp.accounts.selectors import membership_list_for_user
from webapp.accounts.services import api_token_create, audit_record
from webapp.accounts.views import LOCKED_OUT, login_cooloff_seconds
from webapp.api import launch
from webapp.api import selectors as api_selectors
from webapp.api import serializers as s
from webapp.api.errors import Conflict, form_errors, service_errors
from webapp.api.parsers import DepthSafeJSONParser, refuse_oversized_body
from webapp.experiments import downloads, exports, external, metrics, selectors, services
from webapp.experiments.artifacts import ArtifactDamaged
from webapp.experiments.dataset_files import DatasetDamaged
from webapp.experiments.dataset_views import jsonl_response
from webapp.experiments.forms import AdapterUploadForm, DatasetUploadForm
from webapp.experiments.metric_files import metrics_file_response
from webapp.experiments.models import ArtifactKind, ExportStatus
from webapp.experiments.pages import damage_before_sending
from webapp.experiments.zipstream import stream_zip
from webapp.http import client_ip, error_text

ERRORS = {
    400: OpenApiResponse(description="Invalid: {field: [messages]} or {detail}."),
    403: OpenApiResponse(s.ErrorSerializer, description="Your role may not do this."),
    404: OpenApiResponse(s.ErrorSerializer, description="No such object in your teams."),
}
TOO_LARGE = OpenApiResponse(s.ErrorSerializer, description="The body is over the limit.")
CONFLICT = {409: OpenApiResponse(s.ErrorSerializer, description="Not in a state for this.")}
OVER_QUOTA = {429: OpenApiResponse(s.ErrorSerializer, description="Over a quota: it names it.")}
WRONG_LOGIN = "Wrong username or password."
VERIFY_FIRST_BYTES = downloads.VERIFY_FIRST_BYTES  # this small: checked whole before sent


class Pagination(LimitOffsetPagination):
    max_limit = 500


def validated(serializer_class, data) -> dict:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def run_data(request, runs, *, many: bool = False):
    """Run JSON for one run or a page of them, with their latest losses read in one query."""
    run_list = list(runs) if many else [runs]
    latest = api_selectors.run_latest_metrics(run_ids=[run.id for run in run_list])
    context = {"request": request, "latest": latest}
    return s.RunSerializer(runs, many=many, context=context).data


# ---- account and catalogue -------------------------------------------------------------------


class Me(APIView):
    @extend_schema(responses=s.MeSerializer)
    def get(self, request):
        user = request.user
        data = {
            "id": user.id,
            "username": user.get_username(),
            "teams": membership_list_for_user(user=user),
            "projects": _projects(user),
        }
        return Response(s.MeSerializer(data, context=_launch_context(user)).data)


def _projects(user):
    return selectors.project_list_for_user(user=user).order_by("team__name", "name")


def _launch_context(user) -> dict:
    launchable = selectors.project_list_for_launch(user=user).values_list("id", flat=True)
    return {"launchable": set(launchable)}


class TokenCreate(APIView):
    """A personal API token from a username and password (no session, no CSRF)."""

    parser_classes = [DepthSafeJSONParser, FormParser]
    authentication_classes = []
    permission_classes = [AllowAny]

    @extend_schema(
        request=s.TokenRequestSerializer,
        responses={
            201: s.TokenSerializer,
            400: s.ErrorSerializer,
            429: OpenApiResponse(s.ErrorSerializer, description="Too many failed logins."),
        },
        auth=[],
    )
    def post(self, request):
        data = validated(s.TokenRequestSerializer, request.data)
        username, ip = data["username"], client_ip(request)
        user = authenticate(request, username=username, password=data["password"])
        if user is None:
            _audit_login(action="login.failed", actor=None, username=username[:150], ip=ip)
            # django-axes marks the request it saw (this DRF request, so its middleware cannot).
            if getattr(request, "axes_locked_out", False):
                raise Throttled(wait=login_cooloff_seconds(), detail=LOCKED_OUT)
            raise ValidationError({"detail": WRONG_LOGIN})
        token, plain = api_token_create(user=user, name=data["name"], ip=ip)
        _audit_login(action="login", actor=user, username=user.get_username(), ip=ip)
        body = {"id": token.id, "name": token.name, "token": plain}
        return Response(s.TokenSerializer(body).data, status=status.HTTP_201_CREATED)


def _audit_login(*, action: str, actor, username: str, ip: str | None) -> None:
    """As the login page records it (the target is what the team's audit log matches on)."""
    detail = {"via": "api"} if actor else {"username": username, "via": "api"}
    audit_record(actor=actor, action=action, target=username, detail=detail, ip=ip)


class MethodList(APIView):
    @extend_schema(responses=s.MethodSerializer(many=True))
    def get(self, request):
        return Response(s.MethodSerializer(api_selectors.method_specs(), many=True).data)


class ProjectList(APIView):
    @extend_schema(responses=s.ProjectListSerializer(many=True))
    def get(self, request):
        projects, context = _projects(request.user), _launch_context(request.user)
        return Response(s.ProjectListSerializer(projects, many=True, context=context).data)


# ---- datasets --------------------------------------------------------------------------------


class DatasetList(generics.GenericAPIView):
    pagination_class = Pagination
    parser_classes = [MultiPartParser, FormParser]
    serializer_class = s.DatasetSerializer

    def initial(self, request, *args, **kwargs):
        """Refuse an oversized upload from its Content-Length before anything reads it."""
        if request.method == "POST":
            form = DatasetUploadForm
            refuse_oversized_body(
                request, limit=form.max_body_bytes(), message=form.too_large_message()
            )
        super().initial(request, *args, **kwargs)

    @extend_schema(responses=s.DatasetSerializer(many=True))
    def get(self, request):
        page = self.paginate_queryset(selectors.dataset_list_for_user(user=request.user))
        data = s.DatasetSerializer(page, many=True, context={"request": request}).data
        return self.get_paginated_response(data)

    @extend_schema(
        request={"multipart/form-data": s.DatasetUploadSerializer},
        responses={201: s.DatasetSerializer, 413: TOO_LARGE, **ERRORS},
    )
    def post(self, request):
        teams = selectors.team_list_for_user(user=request.user)
        form = DatasetUploadForm(request.data, request.FILES, teams=teams)
        if not form.is_valid():
            raise ValidationError(form_errors(form))
        with service_errors():
            dataset = services.dataset_upload_create(user=request.user, **form.upload_kwargs())
        data = s.DatasetSerializer(dataset, context={"request": request}).data
        return Response(data, status=status.HTTP_201_CREATED)


class DatasetDetail(APIView):
    @extend_schema(responses={200: s.DatasetDetailSerializer, **ERRORS, **CONFLICT})
    def get(self, request, dataset_id: int):
        dataset = selectors.dataset_get_for_user(user=request.user, dataset_id=dataset_id)
        try:
            preview = selectors.dataset_preview(dataset=dataset)
        except DatasetDamaged as exc:
            raise Conflict(f"{exc}.") from None
        context = {"request": request, "preview": preview}
        return Response(s.DatasetDetailSerializer(dataset, context=context).data)

    @extend_schema(responses={204: None, **ERRORS, **CONFLICT})
    def delete(self, request, dataset_id: int):
        dataset = selectors.dataset_get_for_user(user=request.user, dataset_id=dataset_id)
        with service_errors(conflict=True):
            services.dataset_delete(user=request.user, dataset=dataset, ip=client_ip(request))
        return Response(status=status.HTTP_204_NO_CONTENT)


class DatasetDownload(APIView):
    @extend_schema(
        responses={(200, "application/x-ndjson"): OpenApiTypes.BINARY, **ERRORS, **CONFLICT}
    )
    def get(self, request, dataset_id: int):
        """Every row as JSON lines, as an attachment named dataset-<id>.jsonl: checked whole
        first up to 64 MiB (a damaged file is a 409), streamed hashed and cut beyond."""
        dataset = selectors.dataset_get_for_user(user=request.user, dataset_id=dataset_id)
        try:
            return jsonl_response(dataset)
        except DatasetDamaged as exc:
            raise Conflict(f"{exc}.") from None


# ---- runs ------------------------------------------------------------------------------------


class RunList(generics.GenericAPIView):
    pagination_class = Pagination
    parser_classes = [DepthSafeJSONParser]
    serializer_class = s.RunSerializer

    @extend_schema(parameters=[s.RunFilterSerializer], responses=s.RunSerializer(many=True))
    def get(self, request):
        params = s.RunFilterSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        runs = selectors.run_filter_for_user(user=request.user, **params.filters())
        page = self.paginate_queryset(runs)
        return self.get_paginated_response(run_data(request, page, many=True))

    @extend_schema(
        request=PolymorphicProxySerializer(
            component_name="RunCreateRequest",
            serializers=[s.RunCreateSerializer, s.ExternalRunCreateSerializer],
            resource_type_field_name=None,
        ),
        responses={201: s.RunSerializer, **ERRORS, **OVER_QUOTA},
        description="A launch (validated as the launch form validates it, queued for a "
        'worker) or, with "external": true, a run trained elsewhere: free form, running at '
        "once, fed by POST metrics/ and artifacts/, ended by POST finish/.",
    )
    def post(self, request):
        if _external(request.data):
            return self._create_external(request)
        payload = validated(s.RunCreateSerializer, request.data)
        with service_errors():
            form, method_config = launch.run_form_validate(user=request.user, payload=payload)
            create = services.run_create_external if payload["external"] else services.run_create
            placement = {} if payload["external"] else form.placement()
            run = create(
                user=request.user,
                method=form.cleaned_data["method"],
                method_config=method_config,
                **form.launch_kwargs(),
                **placement,
            )
        return Response(run_data(request, run), status=status.HTTP_201_CREATED)

    def _create_external(self, request):
        payload = validated(s.ExternalRunCreateSerializer, request.data)
        user = request.user
        with service_errors():
            project_id = launch.launch_project_id(user=user, project_id=payload.get("project"))
        project = selectors.project_list_for_launch(user=user).filter(id=project_id).first()
        if project is None:  # another team's id reads as an unknown one
            raise ValidationError({"project": ["No such project of yours."]})
        dataset = None
        if payload.get("dataset") is not None:
            datasets = selectors.dataset_list_for_user(user=user)
            dataset = datasets.filter(id=payload["dataset"]).first()
            if dataset is None:
                raise ValidationError({"dataset": ["No such dataset of yours."]})
        name = payload.get("name") or f"{payload['method']} on {payload['base_model']}"
        with service_errors():
            run = services.run_create_external(
                user=user,
                project=project,
                name=name[:120],
                dataset=dataset,
                **{key: payload[key] for key in EXTERNAL_FIELDS},
            )
        return Response(run_data(request, run), status=status.HTTP_201_CREATED)


EXTERNAL_FIELDS = ("base_model", "method", "method_config", "train_config", "tags", "summary")
EXTERNAL_FIELDS += ("profile",)


def _external(data) -> bool:
    """Whether a POST /runs/ body asks for a run trained elsewhere (then it is judged by
    ExternalRunCreateSerializer, else exactly as a launch)."""
    try:
        return bool(serializers.BooleanField().to_internal_value(data.get("external", False)))
    except (AttributeError, serializers.ValidationError):
        return False  # not a JSON object, or not a boolean: the launch serializer says so


class RunDetail(APIView):
    @extend_schema(responses={200: s.RunSerializer, **ERRORS})
    def get(self, request, run_id: int):
        run = selectors.run_get_for_user(user=request.user, run_id=run_id)
        return Response(run_data(request, run))

    @extend_schema(responses={204: None, **ERRORS, **CONFLICT})
    def delete(self, request, run_id: int):
        run = selectors.run_get_for_user(user=request.user, run_id=run_id)
        with service_errors(conflict=True):
            services.run_delete(user=request.user, run=run, ip=client_ip(request))
        return Response(status=status.HTTP_204_NO_CONTENT)


class RunCancel(APIView):
    @extend_schema(request=None, responses={200: s.RunSerializer, **ERRORS})
    def post(self, request, run_id: int):
        run = selectors.run_get_for_user(user=request.user, run_id=run_id)
        with service_errors():
            run = services.run_cancel_request(user=request.user, run=run)
        return Response(run_data(request, run))


class RunMetrics(APIView):
    parser_classes = [DepthSafeJSONParser]

    def initial(self, request, *args, **kwargs):
        if request.method == "POST":
            refuse_oversized_body(request)
        super().initial(request, *args, **kwargs)

    @extend_schema(
        parameters=[s.MetricsQuerySerializer],
        responses={200: s.MetricsSerializer, **ERRORS},
        description="Downsampled series of the keys named, or of a page of the run's keys "
        "(follow next_cursor for the rest). Every point, not downsampled: metrics.csv, "
        "metrics.parquet.",
    )
    def get(self, request, run_id: int):
        run = selectors.run_get_for_user(user=request.user, run_id=run_id)
        query = validated(s.MetricsQuerySerializer, request.query_params)
        keys, next_cursor = query["keys"], None
        if not keys:  # a page of the run's keys: a run may hold thousands
            page, next_cursor = api_selectors.metric_keys_page(
                run=run, cursor=query["cursor"], size=settings.METRIC_KEYS_PER_PAGE
            )
            keys = tuple(page)
        series = selectors.metric_series(run=run, keys=keys, max_points=query["max_points"])
        return Response({"series": series, "next_cursor": next_cursor})

    @extend_schema(
        request=s.MetricsIngestSerializer,
        responses={200: s.IngestResultSerializer, 413: TOO_LARGE, **ERRORS, **CONFLICT},
        description="Points of a run trained elsewhere (external). A point already stored "
        "(same key and step) is kept as it was, so a retried batch changes nothing. A run "
        "holds at most PEFTLAB_MAX_METRIC_KEYS_PER_RUN distinct keys (1,000 by default): a "
        "batch that would pass it is refused whole (400, naming the cap).",
    )
    def post(self, request, run_id: int):
        run = selectors.run_get_for_user(user=request.user, run_id=run_id)
        points = validated(s.MetricsIngestSerializer, request.data)["points"]
        with service_errors(conflict=True):
            try:
                received = metrics.metrics_ingest(
                    user=request.user, run=run, points=[metrics.Point(**point) for point in points]
                )
            except metrics.MetricKeysOverCap as exc:  # a bound of the request: 400, not 409
                raise ValidationError({"detail": error_text(exc)}) from None
        return Response({"received": received})


METRICS_FILE = (
    "Every stored point of the run (full resolution, not the downsampled series of "
    "metrics/), streamed: columns step, key, value, wall_time, rows by key then step."
)


class RunMetricsCsv(APIView):
    fmt = "csv"

    def perform_content_negotiation(self, request, force=False):
        # Accept: text/csv (or Parquet's type) is what a client of this file sends; DRF would
        # answer 406, knowing only JSON. Errors are still JSON.
        return super().perform_content_negotiation(request, force=True)

    @extend_schema(
        responses={
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description=METRICS_FILE),
            **ERRORS,
        },
    )
    def get(self, request, run_id: int):
        run = selectors.run_get_for_user(user=request.user, run_id=run_id)
        return metrics_file_response(run, self.fmt)


class RunMetricsParquet(RunMetricsCsv):
    fmt = "parquet"

    @extend_schema(
        responses={
            (200, "application/vnd.apache.parquet"): OpenApiResponse(
                OpenApiTypes.BINARY,
                description=f"{METRICS_FILE} A Parquet file (int64, string, float64, "
                "float64), one row group per 100,000 rows.",
            ),
            **ERRORS,
        },
    )
    def get(self, request, run_id: int):
        return super().get(request, run_id)


class RunFinish(APIView):
    parser_classes = [DepthSafeJSONParser]

    @extend_schema(
        request=s.FinishSerializer, responses={200: s.RunSerializer, **ERRORS, **CONFLICT}
    )
    def post(self, request, run_id: int):
        run = selectors.run_get_for_user(user=request.user, run_id=run_id)
        data = validated(s.FinishSerializer, request.data)
        with service_errors(conflict=True):
            try:
                run = services.run_finish_external(
                    user=request.user,
                    run=run,
                    status=data["status"],
                    summary=data.get("summary"),
                    profile=data.get("profile"),
                )
            except external.ProfileRefused as exc:  # with what was reported before: a 400
                raise ValidationError({"profile": exc.messages}) from None
        return Response(run_data(request, run))


class RunArtifacts(APIView):
    parser_classes = [MultiPartParser]

    def initial(self, request, *args, **kwargs):
        """Refuse a body over the file cap from its Content-Length before anything reads it."""
        if request.method == "POST":
            limit = settings.RUN_FILE_MAX_BYTES + UPLOAD_FRAMING_BYTES
            refuse_oversized_body(
                request,
                limit=limit,
                message=f"The body is larger than {limit:,} bytes: a file is at most "
                f"{settings.RUN_FILE_MAX_BYTES:,} (PEFTLAB_RUN_FILE_MAX_BYTES).",
            )
        super().initial(request, *args, **kwargs)

    @extend_schema(
        parameters=[
            OpenApiParameter("kind", str, enum=[k.value for k in ArtifactKind]),
            OpenApiParameter("version", int, description="Only this version's files."),
        ],
        responses={200: s.ArtifactSerializer(many=True), **ERRORS},
        description="Every stored file of the run, every version (oldest first by name); "
        '`damaged` says why a file failed its last check ("" when it passed or was not '
        "checked since it was written). Each row's download_url serves that version.",
    )
    def get(self, request, run_id: int):
        run = selectors.run_get_for_user(user=request.user, run_id=run_id)
        artifacts = selectors.artifact_list_for_run(run=run)
        query = validated(s.ArtifactQuerySerializer, request.query_params)
        if query.get("kind"):
            artifacts = artifacts.filter(kind=query["kind"])
        if query.get("version"):
            artifacts = artifacts.filter(version=query["version"])
        return Response(
            s.ArtifactSerializer(artifacts, many=True, context={"request": request}).data
        )

    @extend_schema(
        request={"multipart/form-data": s.ArtifactUploadSerializer},
        responses={
            201: s.ArtifactSerializer(many=True),
            413: TOO_LARGE,
            **ERRORS,
            **CONFLICT,
        },
        description="Upload to a run trained elsewhere (external), running or finished: "
        "kind=adapter stores the run's next adapter version (checked as POST /adapters/ "
        "checks one, against the run's base model, which must be a model registered here; "
        "then downloaded, shared and merged as a launched run's), and sets the profile's "
        "adapter_bytes (and trainable_params, unless reported); kind=file stores any file, "
        "streamed into the artifact store with its sha256. Answers the stored files as GET "
        "lists them. 400 for a launched run or a refused file, 403 for a viewer, 409 while "
        "a worker still evaluates an uploaded adapter's run.",
    )
    def post(self, request, run_id: int):
        run = selectors.run_get_for_user(user=request.user, run_id=run_id)
        data = validated(s.ArtifactUploadSerializer, request.data)
        with service_errors():
            try:
                stored = _artifact_upload(request.user, run, data)
            except external.RunBusy as exc:
                raise Conflict(error_text(exc)) from None
        body = s.ArtifactSerializer(stored, many=True, context={"request": request}).data
        return Response(body, status=status.HTTP_201_CREATED)


UPLOAD_FRAMING_BYTES = 1024 * 1024  # the multipart boundaries and the other fields


def _artifact_upload(user, run, data: dict) -> list:
    if data["kind"] == ArtifactKind.ADAPTER:
        return external.run_adapter_upload(
            user=user, run=run, config_file=data["config_file"], weights_file=data["weights_file"]
        )
    artifact = external.run_file_upload(
        user=user,
        run=run,
        upload=data["file"],
        name=data.get("name", ""),
        sha256=data.get("sha256", ""),
    )
    return [artifact]


class ArtifactDownload(APIView):
    @extend_schema(
        responses={
            (200, "application/octet-stream"): OpenApiResponse(description="The file's bytes."),
            **ERRORS,
            **CONFLICT,
        }
    )
    def get(self, request, artifact_id: int):
        """Verified as webapp/experiments/downloads.py says: a file up to VERIFY_FIRST_BYTES
        is checked whole, so damage is a 409 before the body; a bigger one streams hashed and
        a mismatch cuts the transfer. HEAD and single byte ranges (store files) work."""
        artifact = selectors.artifact_get_for_user(user=request.user, artifact_id=artifact_id)
        try:
            return downloads.file_response(request, artifact, verify_first_bytes=VERIFY_FIRST_BYTES)
        except downloads.RangeNotSatisfiable as exc:
            return downloads.not_satisfiable(exc)
        except ArtifactDamaged:
            raise Conflict(
                f"{artifact.name} is damaged: its stored bytes no longer match the sha256 "
                "recorded when it was written, so it is not served."
            ) from None


# ---- sweeps ----------------------------------------------------------------------------------


class SweepList(generics.GenericAPIView):
    pagination_class = Pagination
    parser_classes = [DepthSafeJSONParser]
    serializer_class = s.SweepSerializer

    @extend_schema(responses=s.SweepSerializer(many=True))
    def get(self, request):
        page = self.paginate_queryset(selectors.sweep_list_for_user(user=request.user))
        context = {"request": request}
        return self.get_paginated_response(s.SweepSerializer(page, many=True, context=context).data)

    @extend_schema(
        request=s.SweepCreateSerializer,
        responses={201: s.SweepDetailSerializer, **ERRORS, **OVER_QUOTA},
    )
    def post(self, request):
        payload = validated(s.SweepCreateSerializer, request.data)
        with service_errors():
            form, items = launch.sweep_form_validate(user=request.user, payload=payload)
            sweep = services.sweep_create(
                user=request.user,
                items=items,
                grid=form.cleaned_data["grid"],
                **form.launch_kwargs(),
                **form.placement(),
            )
        return Response(sweep_data(request, sweep), status=status.HTTP_201_CREATED)


class SweepDetail(APIView):
    @extend_schema(responses={200: s.SweepDetailSerializer, **ERRORS})
    def get(self, request, sweep_id: int):
        sweep = selectors.sweep_get_for_user(user=request.user, sweep_id=sweep_id)
        return Response(sweep_data(request, sweep))


def sweep_data(request, sweep):
    runs = sweep.runs.select_related("project__team", "dataset", "created_by")
    runs = list(runs.prefetch_related("tags").order_by("id"))
    latest = api_selectors.run_latest_metrics(run_ids=[run.id for run in runs])
    context = {"request": request, "runs": runs, "latest": latest}
    return s.SweepDetailSerializer(sweep, context=context).data


# ---- adapters trained elsewhere, uploaded as files -------------------------------------------

ADAPTER_UPLOAD_BODY = inline_serializer(
    "AdapterUpload",
    {
        "project": serializers.IntegerField(required=False, help_text="Default: your first."),
        "name": serializers.CharField(required=False, max_length=120),
        "base_model": serializers.CharField(
            required=False, help_text="A catalogue key; default: the config's base model."
        ),
        "dataset": serializers.IntegerField(required=False, help_text="Default: built-in."),
        "config": serializers.FileField(help_text="adapter_config.json"),
        "weights": serializers.FileField(help_text="adapter_model.safetensors (never pickle)"),
    },
)


class AdapterUpload(APIView):
    """An adapter trained elsewhere becomes a finished external run (as on the upload page)."""

    parser_classes = [MultiPartParser]

    @extend_schema(
        request={"multipart/form-data": ADAPTER_UPLOAD_BODY},
        responses={201: s.RunSerializer, **ERRORS},
    )
    def post(self, request):
        user, body = request.user, request.data
        project = body.get("project", "")
        with service_errors():
            project_id = launch.launch_project_id(
                user=user,
                project_id=int(project) if project.isdigit() and len(project) < 19 else None,
            )
        data = {
            "project": project or project_id,
            "name": body.get("name") or "uploaded adapter",
            "base_model": body.get("base_model", ""),
            "dataset": body.get("dataset", ""),
        }
        form = AdapterUploadForm(
            data,
            request.FILES,
            projects=selectors.project_list_for_launch(user=user),
            datasets=selectors.dataset_list_for_user(user=user),
        )
        if not form.is_valid():
            raise ValidationError(form_errors(form))
        with service_errors():
            run = services.adapter_upload_create(user=user, **form.upload_kwargs())
        return Response(run_data(request, run), status=status.HTTP_201_CREATED)


# ---- exports ---------------------------------------------------------------------------------


class RunMerged(APIView):
    """The adapter folded into the base model, built once by a worker (queue "export")."""

    @extend_schema(
        responses={
            (200, "application/zip"): OpenApiResponse(
                description="The adapter folded into the base model (its newest version), "
                "in the base's dtype: config.json, the weights as model.safetensors or, past "
                "PEFTLAB_MERGED_SHARD_SIZE, shards with model.safetensors.index.json, the "
                "tokenizer and README.md (the model card)."
            ),
            202: OpenApiResponse(
                description="Being built: {status, detail}. Ask again after Retry-After."
            ),
            **ERRORS,
            **CONFLICT,
        },
        description="Mergeable methods only (LoRA, DoRA, (IA)³) and succeeded runs; "
        "another method answers 404 with the reason. The first request queues the build "
        "and answers 202 until a worker has stored it; a failed build answers 409 until "
        "a POST asks for it again. `?version=N` downloads an earlier build as it is "
        "(GET /runs/{id}/artifacts/?kind=merged lists them). A damaged file is a 409 "
        "before the body where its size allows, else the transfer is cut.",
        parameters=[OpenApiParameter("version", int, description="An earlier build.")],
    )
    def get(self, request, run_id: int):
        run = selectors.run_get_for_user(user=request.user, run_id=run_id)
        version = validated(s.VersionQuerySerializer, request.query_params).get("version")
        if version is None:
            export = self._request(run)
            if export.status == ExportStatus.FAILED:
                raise Conflict(f"The merged model could not be built: {export.error}")
            if export.status != ExportStatus.READY:
                return self._building(export)
        files = list(exports.merged_files(run, version=version))  # the newest by default
        if not files:
            raise NotFound(f"This run has no merged model version {version}.")
        problem = damage_before_sending(files)
        if problem:
            raise Conflict(problem)
        response = StreamingHttpResponse(stream_zip(files), content_type="application/zip")
        name = f"peftlab-run-{run.id}-merged.zip"
        response["Content-Disposition"] = content_disposition_header(True, name)
        response["X-Content-Type-Options"] = "nosniff"
        return response

    @extend_schema(
        request=None, responses={202: OpenApiResponse(description="{status, detail}"), **ERRORS}
    )
    def post(self, request, run_id: int):
        """Build the merged model (again, after a failure); a build in progress is kept."""
        run = selectors.run_get_for_user(user=request.user, run_id=run_id)
        return self._building(self._request(run, retry=True))

    @staticmethod
    def _request(run, retry: bool = False):
        try:
            return exports.merged_export_request(run=run, retry=retry)
        except DjangoValidationError as exc:
            raise NotFound(error_text(exc)) from exc

    @staticmethod
    def _building(export) -> Response:
        detail = export.get_status_display()
        response = Response({"status": export.status, "detail": detail}, status=202)
        response["Retry-After"] = "5"
        return response


class PlaygroundList(APIView):
    """Ask the base model and up to four adapters the same prompt; a worker answers."""

    parser_classes = [DepthSafeJSONParser]

    @extend_schema(
        request=s.PlaygroundRequestSerializer,
        responses={201: s.PlaygroundPromptSerializer, **ERRORS},
    )
    def post(self, request):
        body = validated(s.PlaygroundRequestSerializer, request.data)
        visible = selectors.run_list_for_user(user=request.user)
        runs = list(visible.filter(id__in=body["runs"]))
        if len(runs) != len(set(body["runs"])):
            raise NotFound("No such run.")  # another team's run reads like a missing one
        with service_errors():
            prompt = services.playground_prompt_create(
                user=request.user, runs=runs, text=body["text"]
            )
        data = s.PlaygroundPromptSerializer(prompt, context={"request": request}).data
        return Response(data, status=status.HTTP_201_CREATED)


class PlaygroundDetail(APIView):
    @extend_schema(responses={200: s.PlaygroundPromptSerializer, **ERRORS})
    def get(self, request, prompt_id: int):
        prompt = selectors.playground_prompt_get_for_user(user=request.user, prompt_id=prompt_id)
        return Response(s.PlaygroundPromptSerializer(prompt, context={"request": request}).data)
