"""/api/v1/registry/: the model registry of adapters (not /models/, the base models).

    GET    registry/                                  registered models of your teams
    POST   registry/                                  {name, team?, description?}: a new name
    GET    registry/{name}/                           the name, its versions and aliases
    GET    registry/{name}@{alias}/  ·  {name}@v{N}/  one version: run, metrics, files
    POST   registry/{name}/versions/                  {run, adapter_version?}: the next version
    GET    registry/{name}/versions/{N}/              one version;  DELETE: drop it (admins)
    PUT    registry/{name}/aliases/{alias}/           {version}: set or move it (audited)
    DELETE registry/{name}/aliases/{alias}/           remove it (audited)
    GET    registry/{name}@{alias}/download/  ·  {name}@v{N}/download/
           registry/{name}/versions/{N}/download/     the adapter zip, as the run page serves it

A name resolves within the caller's teams. Someone in several teams that each have the name
adds `?team=<team id or name>` (400 otherwise, naming the teams); another team's name is 404.
"""

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from webapp.adapter_registry import selectors, services
from webapp.adapter_registry.models import ModelAlias, ModelVersion, RegisteredModel
from webapp.api.errors import Conflict, service_errors
from webapp.api.parsers import DepthSafeJSONParser
from webapp.api.serializers import ArtifactSerializer
from webapp.experiments import selectors as experiment_selectors
from webapp.experiments.pages import adapter_files, adapter_zip, damage_before_sending
from webapp.http import client_ip

TEAM = OpenApiParameter(
    "team", str, description="A team id or name: needed only when several of your teams have "
    "a registered model of this name."
)  # fmt: skip
ZIP = {
    (200, "application/zip"): OpenApiResponse(
        description="The version's adapter files (HF PEFT layout) and README.md, the model card; "
        "checked against their sha256 before sending (damage: 409), a big one while streaming."
    )
}
ERRORS = {
    400: OpenApiResponse(description="Invalid, or a name several of your teams have."),
    403: OpenApiResponse(description="Your role may not do this."),
    404: OpenApiResponse(description="No such name, version or alias in your teams."),
}


# ---- serializers -----------------------------------------------------------------------------


class VersionSerializer(serializers.ModelSerializer):
    ref = serializers.SerializerMethodField(help_text="name@vN")
    registered_model = serializers.CharField(source="registered.name")
    team = serializers.CharField(source="registered.team.name")
    run = serializers.IntegerField(source="run_id")
    run_name = serializers.CharField(source="run.name")
    base_model = serializers.CharField(source="run.base_model")
    method = serializers.CharField(source="run.method")
    metrics = serializers.SerializerMethodField(help_text="The run's numeric summary values.")
    aliases = serializers.SerializerMethodField()
    files = serializers.SerializerMethodField()
    size = serializers.SerializerMethodField()
    created_by = serializers.CharField(source="created_by.username", default=None)
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = ModelVersion
        fields = [
            "ref", "registered_model", "team", "number", "run", "run_name", "adapter_version",
            "base_model", "method", "metrics", "aliases", "files", "size", "description",
            "created_by", "created_at", "download_url",
        ]  # fmt: skip

    def get_ref(self, version: ModelVersion) -> str:
        return f"{version.registered.name}@v{version.number}"

    def get_metrics(self, version: ModelVersion) -> dict:
        return selectors.summary_metrics(version.run)

    def get_aliases(self, version: ModelVersion) -> list[str]:
        return sorted(alias.name for alias in version.aliases.all())

    def get_files(self, version: ModelVersion) -> list[dict]:
        return ArtifactSerializer(self._files(version), many=True, context=self.context).data

    def get_size(self, version: ModelVersion) -> int:
        return sum(artifact.size for artifact in self._files(version))

    def get_download_url(self, version: ModelVersion) -> str:
        path = f"/api/v1/registry/{version.registered.name}/versions/{version.number}/download/"
        return self.context["request"].build_absolute_uri(path + _team_query(version))

    @staticmethod
    def _files(version: ModelVersion):
        if not hasattr(version, "files"):
            version.files = selectors.version_files(version)
        return version.files


class AliasSerializer(serializers.ModelSerializer):
    version = serializers.IntegerField(source="version.number")
    updated_by = serializers.CharField(source="updated_by.username", default=None)

    class Meta:
        model = ModelAlias
        fields = ["name", "version", "updated_by", "updated_at"]


class RegisteredSerializer(serializers.ModelSerializer):
    team = serializers.CharField(source="team.name")
    team_id = serializers.IntegerField()
    versions = serializers.IntegerField(source="version_count", help_text="How many.")
    aliases = serializers.SerializerMethodField()
    url = serializers.SerializerMethodField()

    class Meta:
        model = RegisteredModel
        fields = [
            "id", "name", "team", "team_id", "description", "versions", "aliases", "url",
            "created_at",
        ]  # fmt: skip

    def get_aliases(self, registered: RegisteredModel) -> list[dict]:
        aliases = sorted(registered.aliases.all(), key=lambda alias: alias.name)  # prefetched
        return AliasSerializer(aliases, many=True).data

    def get_url(self, registered: RegisteredModel) -> str:
        return self.context["request"].build_absolute_uri(f"/registry/{registered.id}/")


class RegisteredDetailSerializer(RegisteredSerializer):
    versions = serializers.SerializerMethodField()

    def get_versions(self, registered: RegisteredModel) -> list[dict]:
        versions = selectors.versions_with_files(registered=registered)
        return VersionSerializer(versions, many=True, context=self.context).data


class RegisteredCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    team = serializers.IntegerField(
        min_value=1, required=False, help_text="The team's id (GET /me/); default: your only team."
    )
    description = serializers.CharField(max_length=2000, required=False, allow_blank=True)


class VersionCreateSerializer(serializers.Serializer):
    run = serializers.IntegerField(min_value=1, max_value=2**63 - 1)
    adapter_version = serializers.IntegerField(
        min_value=1, max_value=2**31 - 1, required=False, help_text="Default: the newest."
    )
    description = serializers.CharField(max_length=2000, required=False, allow_blank=True)


class AliasSetSerializer(serializers.Serializer):
    version = serializers.IntegerField(min_value=1, max_value=2**31 - 1)


def _team_query(version: ModelVersion) -> str:
    return f"?team={version.registered.team_id}"


# ---- views -----------------------------------------------------------------------------------


def _team_param(request) -> str | None:
    team = request.query_params.get("team", "").strip()
    if len(team) > 100:
        raise ValidationError({"team": ["A team id or name, at most 100 characters."]})
    return team or None


def _registered(request, name: str) -> RegisteredModel:
    with service_errors():  # RegistryAmbiguous: 400 naming the teams
        return selectors.registered_named_for_user(
            user=request.user, name=name, team=_team_param(request)
        )


def _version(request, ref: str) -> ModelVersion:
    name, selector = selectors.ref_parse(ref)
    if selector is None:
        raise NotFound("Name a version: name@alias or name@vN.")
    return selectors.version_selected(registered=_registered(request, name), selector=selector)


def _context(request) -> dict:
    return {"request": request}


class RegistryList(APIView):
    parser_classes = [DepthSafeJSONParser]

    @extend_schema(parameters=[TEAM], responses=RegisteredSerializer(many=True))
    def get(self, request):
        names = selectors.registered_list_for_user(user=request.user, team=_team_param(request))
        names = names.prefetch_related("aliases__version", "aliases__updated_by")
        return Response(RegisteredSerializer(names, many=True, context=_context(request)).data)

    @extend_schema(
        request=RegisteredCreateSerializer, responses={201: RegisteredDetailSerializer, **ERRORS}
    )
    def post(self, request):
        body = RegisteredCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        team = self._team(request, data.get("team"))
        with service_errors():
            registered = services.registered_create(
                user=request.user,
                team=team,
                name=data["name"],
                description=data.get("description", ""),
                ip=client_ip(request),
            )
        answer = RegisteredDetailSerializer(registered, context=_context(request)).data
        return Response(answer, status=status.HTTP_201_CREATED)

    @staticmethod
    def _team(request, team_id: int | None):
        teams = experiment_selectors.team_list_for_user(user=request.user)
        if team_id is not None:
            team = teams.filter(id=team_id).first()
            if team is None:
                raise NotFound("No such team among yours.")
            return team
        if teams.count() != 1:
            raise ValidationError({"team": ["You are in several teams: say which (its id)."]})
        return teams.get()


class RegistryDetail(APIView):
    @extend_schema(
        parameters=[TEAM],
        responses={200: RegisteredDetailSerializer, **ERRORS},
        description="`name`: the registered model with its versions and aliases; "
        "`name@alias` or `name@vN`: that one version.",
    )
    def get(self, request, ref: str):
        name, selector = selectors.ref_parse(ref)
        registered = _registered(request, name)
        if selector is None:
            return Response(RegisteredDetailSerializer(registered, context=_context(request)).data)
        version = selectors.version_selected(registered=registered, selector=selector)
        return Response(VersionSerializer(version, context=_context(request)).data)


class RegistryVersions(APIView):
    parser_classes = [DepthSafeJSONParser]

    @extend_schema(
        parameters=[TEAM],
        request=VersionCreateSerializer,
        responses={201: VersionSerializer, **ERRORS},
        description="Register a run's adapter (its newest version unless `adapter_version`) "
        "as the next version. The run must be of the name's team and finished "
        "(succeeded, or trained elsewhere and no longer running); its files stay with it.",
    )
    def post(self, request, name: str):
        registered = _registered(request, name)
        body = VersionCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        run = experiment_selectors.run_get_for_user(user=request.user, run_id=data["run"])
        with service_errors():
            version = services.version_create(
                user=request.user,
                registered=registered,
                run=run,
                adapter_version=data.get("adapter_version"),
                description=data.get("description", ""),
                ip=client_ip(request),
            )
        answer = VersionSerializer(version, context=_context(request)).data
        return Response(answer, status=status.HTTP_201_CREATED)


class RegistryVersion(APIView):
    @extend_schema(parameters=[TEAM], responses={200: VersionSerializer, **ERRORS})
    def get(self, request, name: str, number: int):
        version = selectors.version_get(registered=_registered(request, name), number=number)
        return Response(VersionSerializer(version, context=_context(request)).data)

    @extend_schema(parameters=[TEAM], responses={204: None, **ERRORS})
    def delete(self, request, name: str, number: int):
        """Admins and owners; refused while an alias points at it. The run keeps its files."""
        version = selectors.version_get(registered=_registered(request, name), number=number)
        with service_errors(conflict=True):
            services.version_delete(user=request.user, version=version, ip=client_ip(request))
        return Response(status=status.HTTP_204_NO_CONTENT)


class RegistryAlias(APIView):
    parser_classes = [DepthSafeJSONParser]

    @extend_schema(
        parameters=[TEAM], request=AliasSetSerializer, responses={200: AliasSerializer, **ERRORS}
    )
    def put(self, request, name: str, alias: str):
        """Point the alias at a version (creating or moving it); audited with from and to."""
        registered = _registered(request, name)
        body = AliasSetSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        version = selectors.version_get(
            registered=registered, number=body.validated_data["version"]
        )
        with service_errors():
            moved = services.alias_set(
                user=request.user,
                registered=registered,
                name=alias,
                version=version,
                ip=client_ip(request),
            )
        return Response(AliasSerializer(moved).data)

    @extend_schema(parameters=[TEAM], responses={204: None, **ERRORS})
    def delete(self, request, name: str, alias: str):
        registered = _registered(request, name)
        found = selectors.alias_get(registered=registered, name=alias)
        with service_errors():
            services.alias_delete(
                user=request.user, registered=registered, alias=found, ip=client_ip(request)
            )
        return Response(status=status.HTTP_204_NO_CONTENT)


def _zip(version: ModelVersion):
    files = adapter_files(version.run, version=version.adapter_version)
    if not files:  # the run's rows are protected; this would be a database edited by hand
        raise Conflict(f"{version}: the run's adapter files are gone.")
    problem = damage_before_sending(files)
    if problem:
        raise Conflict(problem)
    filename = f"{version.registered.name}-v{version.number}-adapter.zip"
    return adapter_zip(version.run, files, filename=filename)


class RegistryRefDownload(APIView):
    @extend_schema(parameters=[TEAM], responses={**ZIP, **ERRORS, 409: None})
    def get(self, request, ref: str):
        """name@alias or name@vN: the version's adapter zip (409: a damaged file)."""
        return _zip(_version(request, ref))


class RegistryVersionDownload(APIView):
    @extend_schema(parameters=[TEAM], responses={**ZIP, **ERRORS, 409: None})
    def get(self, request, name: str, number: int):
        return _zip(selectors.version_get(registered=_registered(request, name), number=number))
