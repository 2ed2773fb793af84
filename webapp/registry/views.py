"""The model registry's pages: the list, one model's page, and registering one."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from webapp.accounts.models import Membership, Role
from webapp.accounts.permissions import Action, can
from webapp.http import error_text
from webapp.registry import selectors, services
from webapp.registry.forms import ModelRegisterForm
from webapp.registry.models import ModelStatus
from webapp.registry.presentation import model_page_context


@login_required
@require_GET
def model_list(request):
    models = selectors.model_list_for_user(user=request.user)
    context = {"models": models, "can_register": _admin_teams(request.user).exists()}
    return render(request, "registry/model_list.html", context)


@login_required
@require_GET
def model_detail(request, model_id: int):
    model = selectors.model_get_for_user(user=request.user, model_id=model_id)
    context = model_page_context(model)
    context["can_inspect"] = model.team is None or can(
        user=request.user, team=model.team, action=Action.MODELS
    )
    status = 286 if request.htmx and model.status != ModelStatus.INSPECTING else 200
    if request.htmx:
        return render(request, "registry/model_detail.html#status", context, status=status)
    return render(request, "registry/model_detail.html", context)


@login_required
@require_POST
def model_inspect(request, model_id: int):
    model = selectors.model_get_for_user(user=request.user, model_id=model_id)
    try:
        services.model_inspect_request(user=request.user, model=model)
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
    return redirect("model_detail", model_id=model.id)


def _admin_teams(user):
    teams = Membership.objects.filter(user=user, role__in=(Role.ADMIN, Role.OWNER))
    return selectors.Team.objects.filter(id__in=teams.values("team_id")).order_by("name")


@login_required
@require_http_methods(["GET", "POST"])
def model_register(request):
    teams = _admin_teams(request.user)
    form = ModelRegisterForm(request.POST or None, teams=teams)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            model = services.model_register(user=request.user, **form.register_kwargs())
        except (ValidationError, PermissionDenied) as exc:
            form.add_error("hub" if data["hub"] else "path", error_text(exc))
        else:
            messages.success(request, f"{model.name} is registered; a worker inspects it now.")
            return redirect("model_detail", model_id=model.id)
    context = {"form": form, "roots": settings.MODEL_ROOTS, "hf_cache": settings.HF_HUB_CACHE}
    status = 400 if form.errors else 200
    return render(request, "registry/model_register.html", context, status=status)
