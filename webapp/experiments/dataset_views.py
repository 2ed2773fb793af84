"""The dataset pages: list, upload with row-level errors, preview, download, delete."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from peft_core.data import MAX_COLUMNS, MAX_VALUE_CHARS
from webapp.accounts.permissions import Action, can
from webapp.experiments import selectors, services
from webapp.experiments.dataset_files import DAMAGED, DatasetDamaged, dataset_check
from webapp.experiments.forms import DatasetUploadForm, size_text
from webapp.http import client_ip, error_text
from webapp.registry.models import ModelStatus
from webapp.registry.selectors import model_list_for_user, model_named_for_user

# The model the token preview starts with: one whose tokenizer a fresh install has.
DEFAULT_PREVIEW_MODEL = {"causal-lm": "tiny-llama", "seq-cls": "all-minilm-l6-v2"}
VERIFY_FIRST_BYTES = 64 * 2**20  # a download this small is checked whole before it is sent


@require_GET
def health(request):
    return JsonResponse({"status": "ok"})


@login_required
@require_GET
def dataset_list(request):
    datasets = selectors.dataset_list_for_user(user=request.user)
    context = {"datasets": datasets, "has_uploads": datasets.filter(team__isnull=False).exists()}
    return render(request, "experiments/dataset_list.html", context)


@login_required
@csrf_exempt  # checked by _dataset_upload: CsrfViewMiddleware would parse the body first
@require_http_methods(["GET", "POST"])
def dataset_upload(request):
    """An oversized body is refused from its Content-Length, unread; the rest as a form."""
    if request.method == "POST" and DatasetUploadForm.body_too_large(request):
        teams = selectors.team_list_for_user(user=request.user)
        form, error = DatasetUploadForm(teams=teams), DatasetUploadForm.too_large_message()
        return _dataset_upload_page(request, form, status=413, error=error)
    return _dataset_upload(request)


@csrf_protect
def _dataset_upload(request):
    teams = selectors.team_list_for_user(user=request.user)
    form = DatasetUploadForm(request.POST or None, request.FILES or None, teams=teams)
    if request.method == "POST" and form.is_valid():
        try:
            dataset = services.dataset_upload_create(user=request.user, **form.upload_kwargs())
        except (ValidationError, PermissionDenied) as exc:
            form.add_error("file", error_text(exc))
        else:
            train, val = dataset.split_sizes
            messages.success(
                request, f"Dataset “{dataset.name}”: {train} training and {val} validation rows."
            )
            return redirect("dataset_detail", dataset_id=dataset.id)
    return _dataset_upload_page(request, form, status=400 if form.errors else 200)


def _dataset_upload_page(request, form, *, status: int, error: str = ""):
    limits = {
        "size": size_text(settings.DATASET_MAX_BYTES),
        "rows": settings.DATASET_MAX_ROWS,
        "columns": MAX_COLUMNS,
        "value_chars": MAX_VALUE_CHARS,
    }
    context = {"form": form, "limits": limits, "error": error}
    return render(request, "experiments/dataset_upload.html", context, status=status)


@login_required
@require_GET
def dataset_detail(request, dataset_id: int):
    dataset = selectors.dataset_get_for_user(user=request.user, dataset_id=dataset_id)
    try:
        preview, damaged = selectors.dataset_preview(dataset=dataset), ""
    except DatasetDamaged as exc:
        preview, damaged = [], str(exc)
    if dataset.damaged and not damaged:  # found past the preview by a run or the verifier
        preview, damaged = [], f"{DAMAGED} ({dataset.damaged})"
    columns = list(preview[0].keys()) if preview else []
    ready = model_list_for_user(user=request.user).filter(status=ModelStatus.READY)
    models = [model for model in ready if dataset.task in model.tasks]
    return render(
        request,
        "experiments/dataset_detail.html",
        {
            "dataset": dataset,
            "split": dataset.split_sizes,
            "preview": preview,
            "damaged": damaged,
            "columns": columns,
            "models": models,
            "default_model": DEFAULT_PREVIEW_MODEL[dataset.task],
            "can_delete": dataset.team is not None
            and can(user=request.user, team=dataset.team, action=Action.DELETE),
        },
    )


@login_required
@require_GET
def dataset_tokens(request, dataset_id: int):
    """The first row tokenised by a model (htmx partial): what the loss learns, in colour."""
    from webapp.experiments import token_preview

    dataset = selectors.dataset_get_for_user(user=request.user, dataset_id=dataset_id)
    model = model_named_for_user(user=request.user, name=request.GET.get("model", ""))
    context = {"dataset": dataset, "model": model}
    if model is None or dataset.task not in model.tasks:
        context["problem"] = f"Choose a ready model for {dataset.get_task_display().lower()}."
    else:
        try:
            context["preview"] = token_preview.token_preview(dataset=dataset, model=model)
        except DatasetDamaged as exc:
            context["problem"] = f"No preview: {exc}."
        except token_preview.NoTokenizer:
            context["problem"] = (
                f"{model.name}'s tokenizer is not on this server yet: it is written when the "
                "model is first used (a run, or Inspect on its page)."
            )
    return render(request, "experiments/_token_preview.html", context)


@login_required
@require_GET
def dataset_download(request, dataset_id: int):
    """The stored rows as JSON lines, under a name the server picks. A file up to
    VERIFY_FIRST_BYTES is checked whole, so damage is a 409 before the body; a bigger one
    streams hashed and a mismatch cuts the transfer."""
    dataset = selectors.dataset_get_for_user(user=request.user, dataset_id=dataset_id)
    try:
        return jsonl_response(dataset)
    except DatasetDamaged as exc:
        return HttpResponse(f"{exc}.", status=409, content_type="text/plain; charset=utf-8")


def jsonl_response(dataset):
    """The page's and the API's download; DatasetDamaged before the response where the size
    allows (the caller answers 409), else a stream that a mismatch cuts."""
    chunks = selectors.dataset_jsonl_chunks(dataset=dataset)
    dataset_check(dataset)  # a file gone or resized
    if dataset.file_size <= VERIFY_FIRST_BYTES:
        response = HttpResponse(b"".join(chunks), content_type="application/x-ndjson")
    else:
        response = StreamingHttpResponse(chunks, content_type="application/x-ndjson")
        response["Content-Length"] = dataset.file_size
    response["Content-Disposition"] = f'attachment; filename="dataset-{dataset.id}.jsonl"'
    response["X-Content-Type-Options"] = "nosniff"
    return response


@login_required
@require_POST
def dataset_delete(request, dataset_id: int):
    dataset = selectors.dataset_get_for_user(user=request.user, dataset_id=dataset_id)
    try:
        services.dataset_delete(user=request.user, dataset=dataset, ip=client_ip(request))
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
        return redirect("dataset_detail", dataset_id=dataset.id)
    messages.success(request, f"Dataset “{dataset.name}” deleted.")
    return redirect("datasets")
