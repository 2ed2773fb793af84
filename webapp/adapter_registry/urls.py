from django.urls import path

from webapp.adapter_registry import views

urlpatterns = [
    path("registry/", views.registry_list, name="adapter_registry"),
    path("registry/<int:registered_id>/", views.registered_detail, name="registered_detail"),
    path("registry/<int:registered_id>/aliases/", views.alias_set, name="registry_alias_set"),
    path(
        "registry/<int:registered_id>/aliases/<str:alias>/delete/",
        views.alias_delete,
        name="registry_alias_delete",
    ),
    path(
        "registry/<int:registered_id>/versions/<int:number>/adapter.zip",
        views.version_download,
        name="registry_version_download",
    ),
    path(
        "registry/<int:registered_id>/versions/<int:number>/delete/",
        views.version_delete,
        name="registry_version_delete",
    ),
    path("runs/<int:run_id>/register/", views.run_register, name="run_register"),
]
