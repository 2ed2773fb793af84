from django.urls import path

from webapp.registry import views

urlpatterns = [
    path("models/", views.model_list, name="models"),
    path("models/register/", views.model_register, name="model_register"),
    path("models/<int:model_id>/", views.model_detail, name="model_detail"),
    path("models/<int:model_id>/inspect/", views.model_inspect, name="model_inspect"),
]
