"""/api/v1/models/: the registry, read by every member, written by a team's admins.

GET lists the bundled models and the caller's teams' own; POST registers one (a directory
under an allowed root, or a Hub id@revision) and answers 201 with the row, status
"inspecting" until a worker has built it on the meta device; GET /models/{id}/ has the
inspection (layers, each method's places). Another team's model is 404.
"""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from webapp.api.errors import form_errors, service_errors
from webapp.experiments import selectors as experiment_selectors
from webapp.registry import selectors, services
from webapp.registry.forms import ModelRegisterForm
from webapp.registry.models import BaseModel


class BaseModelSerializer(serializers.ModelSerializer):
    key = serializers.CharField(source="name", help_text="What runs name as base_model.")
    team = serializers.CharField(source="team.name", allow_null=True, default=None)
    url = serializers.SerializerMethodField()

    class Meta:
        model = BaseModel
        fields = [
            "id", "key", "title", "description", "tasks", "team", "source", "location",
            "revision", "commit", "content_sha256", "status", "error", "url",
        ]  # fmt: skip

    def get_url(self, model: BaseModel) -> str:
        return self.context["request"].build_absolute_uri(f"/models/{model.id}/")


class BaseModelDetailSerializer(BaseModelSerializer):
    class Meta(BaseModelSerializer.Meta):
        fields = [*BaseModelSerializer.Meta.fields, "facts", "inspected_at"]


class ModelRegisterSerializer(serializers.Serializer):
    team = serializers.IntegerField(min_value=1, help_text="The team's id (GET /me/).")
    name = serializers.CharField(max_length=100)
    title = serializers.CharField(max_length=200, required=False, allow_blank=True)
    path = serializers.CharField(
        max_length=1000, required=False, allow_blank=True, help_text="A directory under an "
        "allowed root (PEFTLAB_MODEL_ROOTS); relative: under the first root."
    )  # fmt: skip
    hub = serializers.CharField(
        max_length=200, required=False, allow_blank=True, help_text="org/name@revision."
    )


class ModelList(APIView):
    @extend_schema(responses=BaseModelSerializer(many=True))
    def get(self, request):
        models = selectors.model_list_for_user(user=request.user)
        data = BaseModelSerializer(models, many=True, context={"request": request}).data
        return Response(data)

    @extend_schema(request=ModelRegisterSerializer, responses={201: BaseModelDetailSerializer})
    def post(self, request):
        teams = experiment_selectors.team_list_for_user(user=request.user)
        form = ModelRegisterForm(request.data, teams=teams)
        if not form.is_valid():
            raise ValidationError(form_errors(form))
        with service_errors():
            model = services.model_register(user=request.user, **form.register_kwargs())
        body = BaseModelDetailSerializer(model, context={"request": request}).data
        return Response(body, status=status.HTTP_201_CREATED)


class ModelDetail(APIView):
    @extend_schema(responses=BaseModelDetailSerializer)
    def get(self, request, model_id: int):
        model = selectors.model_get_for_user(user=request.user, model_id=model_id)
        return Response(BaseModelDetailSerializer(model, context={"request": request}).data)
