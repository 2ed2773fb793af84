"""Pages and htmx partials. Thin: selectors read, services write."""

from csp.decorators import csp_update
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HTMX_STOP_POLLING, trigger_client_event

from peft_core.catalogue import CATALOGUE
from peft_core.registry import build_config
from webapp.experiments import comparison, configurations, estimates, selectors, services
from webapp.experiments.forms import (
    AdapterUploadForm,
    RunForm,
    SweepForm,
)
from webapp.experiments.method_forms import METHOD_FORMS, expand_sweep, method_form_initial
from webapp.experiments.metric_files import metrics_file_response
from webapp.experiments.models import RunStatus
from webapp.experiments.pages import (
    PLOTLY_WEBGL_CSP,
    adapter_response,
    compare_context,
    merged_build,
    merged_panel,
    merged_response,
    requested_version,
    role_can,
    run_page_context,
)
from webapp.experiments.quotas import QuotaExceeded
from webapp.experiments.run_list_views import run_filters
from webapp.experiments.run_search import QueryError
from webapp.http import client_ip, error_text, int_or_none


@require_GET
def health(request):
    return JsonResponse({"status": "ok"})


def _default_dataset_id(datasets) -> int | None:
    return datasets.filter(builtin_key="sample-instructions").values_list("id", flat=True).first()


# The flashes after a launch tell what happened, never a state ("queued"): the page's live
# status says where the runs are, and a flash stating one would soon contradict it.
LAUNCHED_RUN = "It starts when a worker is free; its status below follows it live."
DEFAULT_MODEL = "smollm2-135m-instruct"
LAUNCHED_SWEEP = "Each starts when a worker is free; the table below follows them live."


@login_required
@require_http_methods(["GET", "POST"])
def run_new(request):
    projects = selectors.project_list_for_launch(user=request.user)
    datasets = selectors.dataset_list_for_user(user=request.user)
    initial = {"base_model": request.GET.get("base_model") or DEFAULT_MODEL, "name": "first run"}
    initial["dataset"] = request.GET.get("dataset") or _default_dataset_id(datasets)
    method_initial = None
    clone_id = int_or_none(request.GET.get("clone", ""))
    if clone_id is not None and request.method == "GET":
        source = selectors.run_get_for_user(user=request.user, run_id=clone_id)
        refusal = clone_refusal(source)
        if refusal:
            messages.error(request, f"This run cannot be cloned. {refusal}")
            return redirect("run_detail", run_id=source.id)
        initial |= _clone_initial(source)
        method_initial = method_form_initial(source.method, source.method_config)
    form = RunForm(request.POST or None, initial=initial, projects=projects, datasets=datasets)
    method = request.POST.get("method") or initial.get("method", "lora")
    method_form = _method_form(method, request.POST or None, initial=method_initial)
    status = 400 if request.method == "POST" else 200  # reached on POST only when refused
    if request.method == "POST" and form.is_valid() and method_form.is_valid():
        try:
            run = services.run_create(
                user=request.user,
                method=form.cleaned_data["method"],
                method_config=method_form.config_kwargs(),
                **form.launch_kwargs(),
                **form.placement(),
            )
        except QuotaExceeded as exc:
            form.add_error(None, str(exc))
            status = 429
        else:
            messages.success(request, f"Run “{run.name}” launched. {LAUNCHED_RUN}")
            return redirect("run_detail", run_id=run.id)
    context = {"form": form, "method_form": method_form, "catalogue": CATALOGUE}
    return render(request, "experiments/run_new.html", context, status=status)


@login_required
@require_GET
def run_method_fields(request):
    """The fieldset of one method, swapped in by htmx when the method select changes."""
    method_form = _method_form(request.GET.get("method", "lora"), None)
    context = {"method_form": method_form}
    response = render(request, "experiments/run_new.html#method-fields", context)
    # The estimate panel listens for this: the new fields are in the form once it fires.
    return trigger_client_event(response, "method-fields-swapped", after="settle")


def _method_form(method: str, data, initial: dict | None = None):
    form_class = METHOD_FORMS.get(method, METHOD_FORMS["lora"])
    return form_class(data, initial=initial)


def clone_refusal(run) -> str:
    """Why the launch form cannot be filled in from this run ("" when it can): a run trained
    elsewhere may name what PEFT Lab cannot train."""
    if not run.external:
        return ""
    if run.method not in METHOD_FORMS:
        return f"It was trained elsewhere with “{run.method}”, not one of PEFT Lab's methods."
    if run.dataset_id is None:
        return "It was trained elsewhere and names no PEFT Lab dataset to train on."
    if not run.base_weights and run.base_model not in CATALOGUE:
        return f"It was trained elsewhere on {run.base_model}, not a model registered here."
    try:
        build_config(run.method, run.method_config)
    except (TypeError, ValueError) as exc:
        return f"It was trained elsewhere with {run.method} settings PEFT Lab refuses: {exc}"
    return ""


# What a clone takes of a run's train config: the launch form's own settings, nothing else.
CLONED_TRAIN_FIELDS = set(RunForm.base_fields) - {
    "name",
    "project",
    "base_model",
    "dataset",
    "method",
}


def _clone_initial(run) -> dict:
    """The launch form filled from a run: same project, model, data, method and schedule."""
    return {
        "name": f"{run.name} (clone)"[:120],
        "project": run.project_id,
        "base_model": run.base_model,
        "dataset": run.dataset_id,
        "method": run.method,
        **{key: value for key, value in run.train_config.items() if key in CLONED_TRAIN_FIELDS},
        "eval_metrics": run.train_config.get("eval_metrics", []),  # none stored: none scored
        "devices": run.devices,
        "gpu_class": run.gpu_class,
        "priority": run.priority,
    }


def _run_context(request, run_id: int) -> dict:
    run = selectors.run_get_for_user(user=request.user, run_id=run_id)
    urls = {
        "page_url": reverse("run_detail", args=[run.id]),
        "live_url": reverse("run_live", args=[run.id]),
        "download_url": reverse("run_adapter_download", args=[run.id]),
        "metrics_csv_url": reverse("run_metrics_csv", args=[run.id]),
        "metrics_parquet_url": reverse("run_metrics_parquet", args=[run.id]),
        "merged_url": reverse("run_merged_download", args=[run.id]),
        "merged_build_url": reverse("run_merged_build", args=[run.id]),
        "merged_status_url": reverse("run_merged_status", args=[run.id]),
    }
    return run_page_context(run, urls=urls) | {
        "role_can": role_can(user=request.user, team=run.project.team),
    }


@login_required
@require_GET
def run_detail(request, run_id: int):
    context = _run_context(request, run_id)
    run = context["run"]
    context |= {
        "clone_refusal": clone_refusal(run),
        "comments": selectors.comment_list_for_run(run=run),
        "share_links": selectors.share_link_list_for_user(user=request.user).filter(
            run=run, revoked_at__isnull=True, expires_at__gt=timezone.now()
        ),
        "share_days": SHARE_DAY_CHOICES,
    }
    return render(request, "experiments/run_detail.html", context)


SHARE_DAY_CHOICES = (1, 7, 30, 90)


@login_required
@require_POST
def run_notes(request, run_id: int):
    run = selectors.run_get_for_user(user=request.user, run_id=run_id)
    try:
        services.run_notes_update(user=request.user, run=run, notes=request.POST.get("notes", ""))
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
    else:
        messages.success(request, "Notes saved.")
    return redirect("run_detail", run_id=run.id)


@login_required
@require_POST
def run_comment(request, run_id: int):
    run = selectors.run_get_for_user(user=request.user, run_id=run_id)
    try:
        services.comment_create(user=request.user, run=run, body=request.POST.get("body", ""))
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
    return redirect(reverse("run_detail", args=[run.id]) + "#comments")


@login_required
@require_POST
def comment_delete(request, comment_id: int):
    comment = selectors.comment_get_for_user(user=request.user, comment_id=comment_id)
    try:
        services.comment_delete(user=request.user, comment=comment)
    except PermissionDenied as exc:
        messages.error(request, error_text(exc))
    return redirect(reverse("run_detail", args=[comment.run_id]) + "#comments")


@login_required
@require_POST
def run_delete(request, run_id: int):
    run = selectors.run_get_for_user(user=request.user, run_id=run_id)
    try:
        services.run_delete(user=request.user, run=run, ip=client_ip(request))
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
        return redirect("run_detail", run_id=run.id)
    messages.success(request, f"Run “{run.name}” deleted.")
    return redirect("runs")


@login_required
@require_POST
def run_share(request, run_id: int):
    run = selectors.run_get_for_user(user=request.user, run_id=run_id)
    return _share_create(request, run.project.team, scope="run", run=run, back=run)


@login_required
@require_POST
def compare_share(request):
    runs = _compared_runs(request, params=request.POST)
    teams = {run.project.team for run in runs}
    if len(teams) != 1:
        messages.error(request, "A shared comparison holds runs of one team; pick them again.")
        return redirect("compare")
    run_ids = [run.id for run in runs]
    return _share_create(request, teams.pop(), scope="compare", run_ids=run_ids, back=None)


def _share_create(request, team, *, scope, run=None, run_ids=None, back=None):
    days = int_or_none(request.POST.get("days", "")) or 0
    try:
        link, secret = services.share_link_create(
            user=request.user,
            team=team,
            scope=scope,
            run=run,
            run_ids=run_ids,
            days=days,
            ip=client_ip(request),
        )
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
        return redirect("run_detail", run_id=run.id) if run else redirect("compare")
    url = request.build_absolute_uri(reverse("share_view", args=[secret]))
    # The secret is shown on this response only: it is not stored, nor put in a message.
    context = {"link": link, "url": url, "run": back, "team": team}
    return render(request, "experiments/share_created.html", context)


@login_required
@require_POST
def share_link_revoke(request, link_id: int):
    link = selectors.share_link_get_for_user(user=request.user, link_id=link_id)
    try:
        services.share_link_revoke(user=request.user, link=link, ip=client_ip(request))
    except PermissionDenied as exc:
        messages.error(request, error_text(exc))
    else:
        messages.info(request, "Share link revoked: it now answers 404.")
    if link.run_id:
        return redirect("run_detail", run_id=link.run_id)
    return redirect("share_links")


@login_required
@require_GET
def share_link_list(request):
    links = selectors.share_link_list_for_user(user=request.user).filter(revoked_at__isnull=True)
    return render(request, "experiments/share_links.html", {"links": links, "now": timezone.now()})


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
        run = services.run_cancel_request(user=request.user, run=run)
    except PermissionDenied as exc:
        messages.error(request, str(exc))
    else:
        messages.info(request, _cancel_message(run))
    return redirect("run_detail", run_id=run.id)


def _cancel_message(run) -> str:
    if run.status == RunStatus.RUNNING:
        return "Cancel requested: the run stops within one training step."
    if run.status == RunStatus.CANCELLED:  # it had not started: cancelled at once
        return f"Run “{run.name}” cancelled."
    return f"Run “{run.name}” had already ended ({run.get_status_display().lower()})."


@login_required
@require_POST
def run_tags(request, run_id: int):
    """Add a tag (field `add`) or remove one (field `remove`)."""
    run = selectors.run_get_for_user(user=request.user, run_id=run_id)
    try:
        if "remove" in request.POST:
            services.run_tag_remove(user=request.user, run=run, name=request.POST["remove"])
        else:
            services.run_tag_add(user=request.user, run=run, name=request.POST.get("add", ""))
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
    return redirect("run_detail", run_id=run.id)


@login_required
@require_GET
def run_adapter_download(request, run_id: int):
    run = selectors.run_get_for_user(user=request.user, run_id=run_id)
    return adapter_response(run, version=requested_version(request))


@login_required
@require_GET
def run_metrics_file(request, run_id: int, fmt: str):
    """Every metric point of the run, as CSV or Parquet (webapp/experiments/metric_files.py)."""
    run = selectors.run_get_for_user(user=request.user, run_id=run_id)
    return metrics_file_response(run, fmt)


@login_required
@require_GET
def run_merged_download(request, run_id: int):
    run = selectors.run_get_for_user(user=request.user, run_id=run_id)
    page_url = reverse("run_detail", args=[run.id])
    return merged_response(run, page_url=page_url, version=requested_version(request))


@login_required
@require_POST
def run_merged_build(request, run_id: int):
    context = _run_context(request, run_id)
    return merged_build(request, context["run"], context, page_url=context["page_url"])


@login_required
@require_GET
def run_merged_status(request, run_id: int):
    return merged_panel(request, _run_context(request, run_id))


@login_required
@require_http_methods(["GET", "POST"])
def sweep_new(request):
    projects = selectors.project_list_for_launch(user=request.user)
    datasets = selectors.dataset_list_for_user(user=request.user)
    initial = _sweep_initial(request, datasets)
    if request.POST.get("preset") == ALL_METHODS:
        # The preset button: the form again, the preset (every method checked, by
        # _sweep_initial) under what was typed.
        initial |= _typed_sweep_fields(request.POST)
        form = SweepForm(initial=initial, projects=projects, datasets=datasets)
        return render(request, "experiments/sweep_new.html", {"form": form})
    form = SweepForm(request.POST or None, initial=initial, projects=projects, datasets=datasets)
    status = 400 if request.method == "POST" else 200  # reached on POST only when refused
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            items = expand_sweep(
                data["methods"],
                data["grid"],
                form.train_config(),
                data["dataset"].task,
                seeds=data["seeds"],
            )
            sweep = services.sweep_create(
                user=request.user,
                items=items,
                grid=data["grid"],
                **form.launch_kwargs(),
                **form.placement(),
            )
        except ValidationError as exc:
            form.add_error("grid", exc)
        except QuotaExceeded as exc:
            form.add_error(None, str(exc))
            status = 429
        else:
            launched = f"Sweep “{sweep.name}” launched: {len(items)} runs. {LAUNCHED_SWEEP}"
            messages.success(request, launched)
            return redirect("sweep_detail", sweep_id=sweep.id)
    return render(request, "experiments/sweep_new.html", {"form": form}, status=status)


# "Compare all methods": every method, bottleneck adapters in their three placements, on a
# short budget. Chosen on a filled-in form, it changes the methods only; the grid and the
# steps fill fields that were left empty.
ALL_METHODS = "all-methods"
ALL_METHODS_PRESET = {
    "methods": list(METHOD_FORMS),
    "grid": "bottleneck.placement = houlsby, pfeiffer, parallel",
    "steps": 20,
}


def _sweep_initial(request, datasets) -> dict:
    """Defaults, the "compare all methods" preset, or a clone of one of the user's sweeps."""
    initial = {
        "name": "method shoot-out",
        "base_model": request.GET.get("base_model") or DEFAULT_MODEL,
        "dataset": _default_dataset_id(datasets),
        "methods": ["lora"],
    }
    if ALL_METHODS in (request.GET.get("preset"), request.POST.get("preset")):
        initial |= ALL_METHODS_PRESET
    clone_id = int_or_none(request.GET.get("clone", ""))
    if clone_id is not None:
        sweep = selectors.sweep_get_for_user(user=request.user, sweep_id=clone_id)
        grid = sweep.grid
        initial |= {
            "name": f"{sweep.name} (clone)",
            "project": sweep.project_id,
            "base_model": sweep.base_model,
            "dataset": sweep.dataset_id,
            "methods": grid.get("methods", []),
            "grid": "\n".join(f"{k} = {', '.join(v)}" for k, v in grid.get("grid", {}).items()),
            **grid.get("train", {}),
            **grid.get("placement", {}),
            "seeds": grid.get("seeds", 1),
        }
    return initial


def _typed_sweep_fields(data) -> dict:
    """The launch form's fields as submitted, those left empty out (the methods aside)."""
    fields = (name for name in SweepForm.base_fields if name != "methods")
    return {name: value for name in fields if (value := data.get(name, "").strip())}


def _sweep_context(request, sweep_id: int) -> dict:
    sweep = selectors.sweep_get_for_user(user=request.user, sweep_id=sweep_id)
    runs = list(sweep.runs.select_related("dataset").order_by("id"))
    return {
        "sweep": sweep,
        "runs": runs,
        "finished": all(run.is_finished for run in runs),
        "role_can": role_can(user=request.user, team=sweep.project.team),
    }


@login_required
@require_GET
def sweep_detail(request, sweep_id: int):
    return render(request, "experiments/sweep_detail.html", _sweep_context(request, sweep_id))


@login_required
@require_POST
def sweep_delete(request, sweep_id: int):
    sweep = selectors.sweep_get_for_user(user=request.user, sweep_id=sweep_id)
    try:
        count = services.sweep_delete(user=request.user, sweep=sweep, ip=client_ip(request))
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
        return redirect("sweep_detail", sweep_id=sweep.id)
    messages.success(request, f"Sweep “{sweep.name}” and its {count} runs deleted.")
    return redirect("runs")


@login_required
@require_GET
def sweep_live(request, sweep_id: int):
    context = _sweep_context(request, sweep_id)
    response = render(request, "experiments/sweep_detail.html#sweep-runs", context)
    if context["finished"]:
        response.status_code = HTMX_STOP_POLLING
    return response


MAX_COMPARED = 50


def _compared_runs(request, params=None) -> list:
    params = request.GET if params is None else params
    ids = [int(i) for i in params.getlist("runs") if i.isdigit()][:MAX_COMPARED]
    if ids:
        return selectors.runs_by_ids_for_user(user=request.user, run_ids=ids)
    try:
        runs = selectors.run_filter_for_user(user=request.user, **run_filters(request.GET))
    except QueryError as exc:
        messages.error(request, f"No runs compared: {exc}")
        return []
    return list(runs.select_related("dataset")[:MAX_COMPARED])


@login_required
@require_GET
@csp_update(PLOTLY_WEBGL_CSP)
def compare(request):
    runs = _compared_runs(request)
    context = compare_context(runs, metric=request.GET.get("metric")) | {
        "query": request.GET.urlencode(),
        "kept_query": kept_query(request, drop="metric"),
        "share_days": SHARE_DAY_CHOICES,
    }
    return render(request, "experiments/compare.html", context)


def kept_query(request, *, drop: str) -> list[tuple[str, str]]:
    """The page's query parameters but `drop`, for a GET form that changes only that one."""
    return [(key, value) for key, values in request.GET.lists() if key != drop for value in values]


@login_required
@require_GET
def compare_csv(request):
    found = configurations.tradeoffs(_compared_runs(request), metric=request.GET.get("metric"))
    rows = configurations.csv_rows(found.rows)
    response = HttpResponse(comparison.tradeoff_csv(rows), content_type="text/csv")
    response["Content-Disposition"] = 'attachment; filename="peftlab-tradeoffs.csv"'
    return response


@login_required
@require_http_methods(["GET", "POST"])
def adapter_upload(request):
    """An adapter trained elsewhere becomes a finished run; refused files change nothing."""
    form = AdapterUploadForm(
        request.POST or None,
        request.FILES or None,
        projects=selectors.project_list_for_launch(user=request.user),
        datasets=selectors.dataset_list_for_user(user=request.user),
    )
    if request.method == "POST" and form.is_valid():
        try:
            run = services.adapter_upload_create(user=request.user, **form.upload_kwargs())
        except (ValidationError, PermissionDenied) as exc:
            form.add_error("weights", error_text(exc))
        else:
            messages.success(request, f"Adapter “{run.name}” checked and stored.")
            return redirect("run_detail", run_id=run.id)
    status = 400 if form.errors else 200
    return render(request, "experiments/adapter_upload.html", {"form": form}, status=status)


@login_required
@require_GET
def run_estimate(request):
    """The launch forms' estimate panel (htmx): parameters, memory and time for the form's
    current values; invalid values get a short note, never an error page."""
    estimate = estimates.launch_estimate(user=request.user, data=request.GET)
    return render(request, "experiments/_estimate.html", {"estimate": estimate})
