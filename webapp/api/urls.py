"""/api/v1/: a personal token (Authorization: Bearer …) or the browser's session (with CSRF)."""

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from webapp.api import models_api, registry_api, views

urlpatterns = [
    path("me/", views.Me.as_view(), name="api-me"),
    path("auth/token/", views.TokenCreate.as_view(), name="api-auth-token"),
    path("models/", models_api.ModelList.as_view(), name="api-models"),
    path("models/<int:model_id>/", models_api.ModelDetail.as_view(), name="api-model"),
    path("methods/", views.MethodList.as_view(), name="api-methods"),
    path("projects/", views.ProjectList.as_view(), name="api-projects"),
    path("datasets/", views.DatasetList.as_view(), name="api-datasets"),
    path("datasets/<int:dataset_id>/", views.DatasetDetail.as_view(), name="api-dataset"),
    path(
        "datasets/<int:dataset_id>/rows.jsonl",
        views.DatasetDownload.as_view(),
        name="api-dataset-download",
    ),
    path("runs/", views.RunList.as_view(), name="api-runs"),
    path("runs/<int:run_id>/", views.RunDetail.as_view(), name="api-run"),
    path("runs/<int:run_id>/cancel/", views.RunCancel.as_view(), name="api-run-cancel"),
    path("runs/<int:run_id>/metrics/", views.RunMetrics.as_view(), name="api-run-metrics"),
    path(
        "runs/<int:run_id>/metrics.csv", views.RunMetricsCsv.as_view(), name="api-run-metrics-csv"
    ),
    path(
        "runs/<int:run_id>/metrics.parquet",
        views.RunMetricsParquet.as_view(),
        name="api-run-metrics-parquet",
    ),
    path("runs/<int:run_id>/finish/", views.RunFinish.as_view(), name="api-run-finish"),
    path("runs/<int:run_id>/artifacts/", views.RunArtifacts.as_view(), name="api-run-artifacts"),
    path("runs/<int:run_id>/merged/", views.RunMerged.as_view(), name="api-run-merged"),
    path(
        "artifacts/<int:artifact_id>/download/",
        views.ArtifactDownload.as_view(),
        name="api-artifact-download",
    ),
    path("adapters/", views.AdapterUpload.as_view(), name="api-adapter-upload"),
    path("playground/", views.PlaygroundList.as_view(), name="api-playground"),
    path(
        "playground/<int:prompt_id>/",
        views.PlaygroundDetail.as_view(),
        name="api-playground-prompt",
    ),
    path("registry/", registry_api.RegistryList.as_view(), name="api-registry"),
    path("registry/<str:ref>/", registry_api.RegistryDetail.as_view(), name="api-registry-ref"),
    path(
        "registry/<str:ref>/download/",
        registry_api.RegistryRefDownload.as_view(),
        name="api-registry-ref-download",
    ),
    path(
        "registry/<str:name>/versions/",
        registry_api.RegistryVersions.as_view(),
        name="api-registry-versions",
    ),
    path(
        "registry/<str:name>/versions/<int:number>/",
        registry_api.RegistryVersion.as_view(),
        name="api-registry-version",
    ),
    path(
        "registry/<str:name>/versions/<int:number>/download/",
        registry_api.RegistryVersionDownload.as_view(),
        name="api-registry-version-download",
    ),
    path(
        "registry/<str:name>/aliases/<str:alias>/",
        registry_api.RegistryAlias.as_view(),
        name="api-registry-alias",
    ),
    path("sweeps/", views.SweepList.as_view(), name="api-sweeps"),
    path("sweeps/<int:sweep_id>/", views.SweepDetail.as_view(), name="api-sweep"),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    # The split view serves its start-up script as a file: the CSP refuses inline scripts.
    path("docs/", SpectacularSwaggerSplitView.as_view(url_name="api-schema"), name="api-docs"),
]
