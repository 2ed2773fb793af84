"""The model registry's pages: the list, a registered model's page, and the forms that write
(Register on the run page, set/move/remove an alias, delete a version). Plain function views
over the selectors and services; a refusal is a message on the page it came from."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from webapp.accounts.permissions import Action, can
from webapp.adapter_registry import selectors, services
from webapp.experiments import selectors as experiment_selectors
from webapp.experiments.pages import adapter_response
from webapp.http import client_ip, error_text, int_or_none

REFUSED = (ValidationError, PermissionDenied)


@login_required
@require_GET
def registry_list(request):
    names = selectors.registered_list_for_user(user=request.user).prefetch_related(
        "aliases__version"
    )
    return render(request, "adapter_registry/list.html", {"names": names})


@login_required
@require_GET
def registered_detail(request, registered_id: int):
    registered = selectors.registered_get_for_user(user=request.user, registered_id=registered_id)
    versions = selectors.versions_with_files(registered=registered)
    for version in versions:
        version.metrics = selectors.key_metrics(version.run)
        version.damaged = any(artifact.damaged for artifact in version.files)
    context = {
        "registered": registered,
        "versions": versions,
        "aliases": selectors.alias_list(registered=registered),
        "history": selectors.registry_history(registered=registered),
        "can_register": can(user=request.user, team=registered.team, action=Action.REGISTER),
        "can_delete": can(user=request.user, team=registered.team, action=Action.DELETE),
    }
    return render(request, "adapter_registry/detail.html", context)


@login_required
@require_GET
def version_download(request, registered_id: int, number: int):
    """The version's adapter zip, served exactly as the run page serves the run's adapter."""
    registered = selectors.registered_get_for_user(user=request.user, registered_id=registered_id)
    version = selectors.version_get(registered=registered, number=number)
    filename = f"{registered.name}-v{version.number}-adapter.zip"
    return adapter_response(version.run, version=version.adapter_version, filename=filename)


@login_required
@require_POST
def run_register(request, run_id: int):
    """The run page's Register: an existing name (`name`) or a new one (`new_name`)."""
    run = experiment_selectors.run_get_for_user(user=request.user, run_id=run_id)
    name = request.POST.get("new_name", "").strip() or request.POST.get("name", "").strip()
    adapter_version = int_or_none(request.POST.get("adapter_version", ""))
    if not name:
        messages.error(request, "Pick a registered model or name a new one.")
        return redirect("run_detail", run_id=run.id)
    try:
        version = services.run_register(
            user=request.user,
            run=run,
            name=name[:100],
            adapter_version=adapter_version or None,
            ip=client_ip(request),
        )
    except REFUSED as exc:
        messages.error(request, error_text(exc))
        return redirect("run_detail", run_id=run.id)
    messages.success(request, f"Registered as {version.registered.name} v{version.number}.")
    return redirect("registered_detail", registered_id=version.registered_id)


@login_required
@require_POST
def alias_set(request, registered_id: int):
    registered = selectors.registered_get_for_user(user=request.user, registered_id=registered_id)
    number = int_or_none(request.POST.get("version", ""))
    alias = request.POST.get("alias", "").strip()[:50]
    try:
        if not number:
            raise ValidationError("Pick a version.")
        version = selectors.version_get(registered=registered, number=number)
        services.alias_set(
            user=request.user,
            registered=registered,
            name=alias,
            version=version,
            ip=client_ip(request),
        )
    except Http404:
        messages.error(request, f"{registered.name} has no version {number}.")
    except REFUSED as exc:
        messages.error(request, error_text(exc))
    else:
        messages.success(request, f"{registered.name}@{alias} → v{number}.")
    return redirect("registered_detail", registered_id=registered.id)


@login_required
@require_POST
def alias_delete(request, registered_id: int, alias: str):
    registered = selectors.registered_get_for_user(user=request.user, registered_id=registered_id)
    found = selectors.alias_get(registered=registered, name=alias)
    try:
        services.alias_delete(
            user=request.user, registered=registered, alias=found, ip=client_ip(request)
        )
    except REFUSED as exc:
        messages.error(request, error_text(exc))
    else:
        messages.success(request, f"Removed the alias {registered.name}@{alias}.")
    return redirect("registered_detail", registered_id=registered.id)


@login_required
@require_POST
def version_delete(request, registered_id: int, number: int):
    registered = selectors.registered_get_for_user(user=request.user, registered_id=registered_id)
    version = selectors.version_get(registered=registered, number=number)
    try:
        services.version_delete(user=request.user, version=version, ip=client_ip(request))
    except REFUSED as exc:
        messages.error(request, error_text(exc))
    else:
        messages.success(
            request, f"Deleted {registered.name} v{number}; the run keeps its adapter."
        )
    return redirect("registered_detail", registered_id=registered.id)
