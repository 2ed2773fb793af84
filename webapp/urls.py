from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from webapp.accounts.views import AuditedLoginView
from webapp.experiments.views import health

urlpatterns = [
    path("login/", AuditedLoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("health/", health, name="health"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("webapp.api.urls")),
    path("", include("webapp.accounts.urls")),
    path("", include("webapp.registry.urls")),
    path("", include("webapp.adapter_registry.urls")),
    path("", include("webapp.experiments.urls")),
]
