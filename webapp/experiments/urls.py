from django.urls import path

from webapp.experiments import (
    dataset_views,
    playground_views,
    run_list_views,
    share_views,
    views,
)

urlpatterns = [
    path("", run_list_views.run_list, name="runs"),
    path("runs/live/", run_list_views.run_list_live, name="runs_live"),
    path("runs/columns/", run_list_views.run_list_columns, name="runs_columns"),
    path("runs/new/", views.run_new, name="run_new"),
    path("runs/upload-adapter/", views.adapter_upload, name="adapter_upload"),
    path("runs/new/method-fields/", views.run_method_fields, name="run_method_fields"),
    path("runs/new/estimate/", views.run_estimate, name="run_estimate"),
    path("runs/<int:run_id>/", views.run_detail, name="run_detail"),
    path("runs/<int:run_id>/live/", views.run_live, name="run_live"),
    path("runs/<int:run_id>/cancel/", views.run_cancel, name="run_cancel"),
    path("runs/<int:run_id>/delete/", views.run_delete, name="run_delete"),
    path("runs/<int:run_id>/tags/", views.run_tags, name="run_tags"),
    path("runs/<int:run_id>/notes/", views.run_notes, name="run_notes"),
    path("runs/<int:run_id>/comments/", views.run_comment, name="run_comment"),
    path("runs/<int:run_id>/share/", views.run_share, name="run_share"),
    path("runs/<int:run_id>/adapter.zip", views.run_adapter_download, name="run_adapter_download"),
    path(
        "runs/<int:run_id>/metrics.csv",
        views.run_metrics_file,
        {"fmt": "csv"},
        name="run_metrics_csv",
    ),
    path(
        "runs/<int:run_id>/metrics.parquet",
        views.run_metrics_file,
        {"fmt": "parquet"},
        name="run_metrics_parquet",
    ),
    path("comments/<int:comment_id>/delete/", views.comment_delete, name="comment_delete"),
    path("sweeps/new/", views.sweep_new, name="sweep_new"),
    path("sweeps/<int:sweep_id>/", views.sweep_detail, name="sweep_detail"),
    path("sweeps/<int:sweep_id>/live/", views.sweep_live, name="sweep_live"),
    path("sweeps/<int:sweep_id>/delete/", views.sweep_delete, name="sweep_delete"),
    path("compare/", views.compare, name="compare"),
    path("compare/tradeoffs.csv", views.compare_csv, name="compare_csv"),
    path("compare/share/", views.compare_share, name="compare_share"),
    path("playground/", playground_views.playground, name="playground"),
    path(
        "playground/<int:prompt_id>/", playground_views.playground_prompt, name="playground_prompt"
    ),
    path(
        "playground/<int:prompt_id>/vote/", playground_views.playground_vote, name="playground_vote"
    ),
    path("datasets/", dataset_views.dataset_list, name="datasets"),
    path("datasets/upload/", dataset_views.dataset_upload, name="dataset_upload"),
    path("datasets/<int:dataset_id>/", dataset_views.dataset_detail, name="dataset_detail"),
    path("datasets/<int:dataset_id>/tokens/", dataset_views.dataset_tokens, name="dataset_tokens"),
    path(
        "datasets/<int:dataset_id>/rows.jsonl",
        dataset_views.dataset_download,
        name="dataset_download",
    ),
    path("datasets/<int:dataset_id>/delete/", dataset_views.dataset_delete, name="dataset_delete"),
    path("share-links/", views.share_link_list, name="share_links"),
    path("share-links/<int:link_id>/revoke/", views.share_link_revoke, name="share_link_revoke"),
    # Read-only pages for people holding a share link; no login, the secret is the key.
    path("s/<str:secret>/", share_views.shared, name="share_view"),
    path("s/<str:secret>/live/", share_views.shared_live, name="share_live"),
    path("s/<str:secret>/adapter.zip", share_views.shared_adapter, name="share_adapter"),
    path(
        "s/<str:secret>/metrics.csv",
        share_views.shared_metrics_file,
        {"fmt": "csv"},
        name="share_metrics_csv",
    ),
    path(
        "s/<str:secret>/metrics.parquet",
        share_views.shared_metrics_file,
        {"fmt": "parquet"},
        name="share_metrics_parquet",
    ),
    path("runs/<int:run_id>/merged.zip", views.run_merged_download, name="run_merged_download"),
    path("runs/<int:run_id>/merged/build", views.run_merged_build, name="run_merged_build"),
    path("runs/<int:run_id>/merged/status", views.run_merged_status, name="run_merged_status"),
    path("s/<str:secret>/merged.zip", share_views.shared_merged, name="share_merged"),
    path(
        "s/<str:secret>/merged/status", share_views.shared_merged_status, name="share_merged_status"
    ),
]
