from django.urls import path

from webapp.experiments import views

urlpatterns = [
    path("", views.run_list, name="runs"),
    path("runs/new/", views.run_new, name="run_new"),
    path("runs/new/method-fields/", views.run_method_fields, name="run_method_fields"),
    path("runs/<int:run_id>/", views.run_detail, name="run_detail"),
    path("runs/<int:run_id>/live/", views.run_live, name="run_live"),
    path("runs/<int:run_id>/cancel/", views.run_cancel, name="run_cancel"),
    path("runs/<int:run_id>/tags/", views.run_tags, name="run_tags"),
    path("runs/<int:run_id>/adapter.zip", views.run_adapter_download, name="run_adapter_download"),
    path("sweeps/new/", views.sweep_new, name="sweep_new"),
    path("sweeps/<int:sweep_id>/", views.sweep_detail, name="sweep_detail"),
    path("sweeps/<int:sweep_id>/live/", views.sweep_live, name="sweep_live"),
    path("compare/", views.compare, name="compare"),
    path("compare/tradeoffs.csv", views.compare_csv, name="compare_csv"),
    path("datasets/", views.dataset_list, name="datasets"),
    path("datasets/upload/", views.dataset_upload, name="dataset_upload"),
    path("datasets/<int:dataset_id>/", views.dataset_detail, name="dataset_detail"),
]
