"""Pages and htmx partials. Thin: selectors read, services write."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HTMX_STOP_POLLING

from peft_core.catalogue import CATALOGUE
from webapp.experiments import selectors, services
from webapp.experiments.forms import DatasetUploadForm, RunForm
from webapp.experiments.method_forms import METHOD_FORMS
from webapp.experiments.zipstream import stream_zip


@require_GET
def health(request):
    return JsonResponse({"status": "ok"})


@login_required
@require_GET
def run_list(request):
    runs = selectors.run_list_for_user(user=request.user)
    page = Paginator(runs, 25).get_page(request.GET.get("page"))
    return render(request, "experiments/run_list.html", {"page": page})


def _default_dataset_id(datasets) -> int | None:
    return datasets.filter(builtin_key="sample-instructions").values_list("id", flat=True).first()


@login_required
@require_http_methods(["GET", "POST"])
def run_new(request):
    projects = selectors.project_list_for_launch(user=request.user)
    datasets = selectors.dataset_list_for_user(user=request.user)
    initial = {"base_model": "smollm2-135m-instruct", "name": "lora-r8"}
    initial["dataset"] = request.GET.get("dataset") or _default_dataset_id(datasets)
    form = RunForm(request.POST or None, initial=initial, projects=projects, datasets=datasets)
    method_form = _method_form(request.POST.get("method", "lora"), request.POST or None)
    if request.method == "POST" and form.is_valid() and method_form.is_valid():
        data = form.cleaned_data
        run = services.run_create(
            user=request.user,
            project=data["project"],
            name=data["name"],
            base_model=data["base_model"],
            dataset=data["dataset"],
            method=data["method"],
            method_config=method_form.config_kwargs(),
            train_config=form.train_config(),
        )
        messages.success(request, f"Run “{run.name}” is queued.")
        return redirect("run_detail", run_id=run.id)
    context = {"form": form, "method_form": method_form, "catalogue": CATALOGUE}
    return render(request, "experiments/run_new.html", context)


@login_required
@require_GET
def run_method_fields(request):
    """The fieldset of one method, swapped in by htmx when the method select changes."""
    method_form = _method_form(request.GET.get("method", "lora"), None)
    return render(request, "experiments/run_new.html#method-fields", {"method_form": method_form})


def _method_form(method: str, data):
    form_class = METHOD_FORMS.get(method, METHOD_FORMS["lora"])
    return form_class(data)


def _run_context(request, run_id: int) -> dict:
    run = selectors.run_get_for_user(user=request.user, run_id=run_id)
    return {
        "run": run,
        "series": selectors.metric_series(run=run),
        "eta_seconds": selectors.run_eta_seconds(run=run),
        "artifacts": selectors.artifact_list_for_run(run=run),
        "model_spec": CATALOGUE.get(run.base_model),
    }


@login_required
@require_GET
def run_detail(request, run_id: int):
    return render(request, "experiments/run_detail.html", _run_context(request, run_id))


@login_required
@require_GET
def run_live(request, run_id: int):
    """The polled partial; status 286 tells htmx to stop polling once the run has ended."""
    context = _run_context(request, run_id)
    response = render(request, "experiments/run_detail.html#live", context)
    if context["run"].is_finished:
        response.status_code = HTMX_STOP_POLLING
    return response


@login_required
@require_POST
def run_cancel(request, run_id: int):
    run = selectors.run_get_for_user(user=request.user, run_id=run_id)
    try:
        services.run_cancel_request(user=request.user, run=run)
    except PermissionDenied as exc:
        messages.error(request, str(exc))
    else:
        messages.info(request, "Cancel requested: the run stops within one training step.")
    return redirect("run_detail", run_id=run.id)


@login_required
@require_GET
def run_adapter_download(request, run_id: int):
    run = selectors.run_get_for_user(user=request.user, run_id=run_id)
    artifacts = list(selectors.artifact_list_for_run(run=run).filter(kind="adapter"))
    if not artifacts:
        return HttpResponse("This run has no adapter yet.", status=404, content_type="text/plain")
    response = StreamingHttpResponse(stream_zip(artifacts), content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="peftlab-run-{run.id}-adapter.zip"'
    return response


@login_required
@require_GET
def dataset_list(request):
    datasets = selectors.dataset_list_for_user(user=request.user)
    return render(request, "experiments/dataset_list.html", {"datasets": datasets})


@login_required
@require_http_methods(["GET", "POST"])
def dataset_upload(request):
    teams = selectors.team_list_for_user(user=request.user)
    form = DatasetUploadForm(request.POST or None, request.FILES or None, teams=teams)
    if request.method == "POST" and form.is_valid():
        upload = form.cleaned_data["file"]
        try:
            dataset = services.dataset_upload_create(
                user=request.user,
                team=form.cleaned_data["team"],
                name=form.cleaned_data["name"],
                filename=upload.name,
                data=upload.read(),
                task=form.cleaned_data["task"],
            )
        except (ValidationError, PermissionDenied) as exc:
            form.add_error("file", exc.messages if hasattr(exc, "messages") else str(exc))
        else:
            messages.success(request, f"Dataset “{dataset.name}”: {dataset.row_count} rows.")
            return redirect("dataset_detail", dataset_id=dataset.id)
    status = 400 if form.errors else 200
    return render(request, "experiments/dataset_upload.html", {"form": form}, status=status)


@login_required
@require_GET
def dataset_detail(request, dataset_id: int):
    dataset = selectors.dataset_get_for_user(user=request.user, dataset_id=dataset_id)
    preview = selectors.dataset_preview(dataset=dataset)
    columns = list(preview[0].keys()) if preview else []
    return render(
        request,
        "experiments/dataset_detail.html",
        {"dataset": dataset, "preview": preview, "columns": columns},
    )
