"""The runs list: filters, the query language of `q` (run_search.py), the metric columns a
person picks, and the live statuses of the runs it shows. Thin: selectors read, services
write."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.http import QueryDict
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HTMX_STOP_POLLING

from peft_core.catalogue import CATALOGUE
from webapp.experiments import run_search, selectors, services
from webapp.experiments.method_forms import METHOD_FORMS
from webapp.experiments.models import Run, RunStatus
from webapp.http import error_text, int_or_none

RUN_FILTERS = ("method", "base_model", "dataset", "status", "tag", "q", "sort", "sweep")
PAGE_SIZE = 25
# What the list never shows and can be large: a run's log and JSON.
RUN_LIST_UNSHOWN = ("log", "summary", "profile", "notes", "error")
# The sortable columns of the fields (a metric column sorts by its key).
FIELD_HEADERS = (
    ("name", "Run"),
    ("status", "Status"),
    ("method", "Method"),
    ("created", "Created"),
)
# The sort menu; any other sort (a column header's) is added to it while it is in use.
SORT_CHOICES = (
    ("newest", "Newest first"),
    ("oldest", "Oldest first"),
    ("name", "Name"),
    ("method", "Method"),
    ("status", "Status"),
)


def run_filters(params) -> dict:
    """The list's GET parameters as selectors.run_filter_for_user's arguments; q and sort
    go whole to the parser, which bounds them and says what is wrong."""
    short = {key: params.get(key, "").strip()[:100] for key in RUN_FILTERS}
    return {
        "method": short["method"],
        "base_model": short["base_model"],
        "dataset_id": int_or_none(short["dataset"]),
        "status": short["status"],
        "tag": short["tag"],
        "query": params.get("q", ""),
        "sweep_id": int_or_none(short["sweep"]),
        "sort": params.get("sort", "").strip() or "newest",
    }


@login_required
@require_GET
def run_list(request):
    filters = run_filters(request.GET)
    try:
        runs = selectors.run_filter_for_user(user=request.user, **filters)
        sort, error = run_search.parse_sort(filters["sort"]), ""
    except run_search.QueryError as exc:
        runs, sort, error = Run.objects.none(), run_search.parse_sort(""), str(exc)
    page = Paginator(runs.defer(*RUN_LIST_UNSHOWN), PAGE_SIZE).get_page(request.GET.get("page"))
    columns = selectors.run_list_columns_for_user(user=request.user)
    shown = _with_cells(list(page.object_list), columns)
    query = request.GET.copy()
    query.pop("page", None)
    context = {
        "page": page,
        "runs": shown,
        "columns": _headers(request.GET, sort, [(f"summary.{key}", key) for key in columns]),
        "headers": {h["key"]: h for h in _headers(request.GET, sort, FIELD_HEADERS)},
        "column_keys": columns,
        "max_columns": services.MAX_RUN_LIST_COLUMNS,
        "back": request.GET.urlencode(),
        "picker_keys": _picker_keys(shown, columns),
        "live_url": _live_url(shown),
        "query": query.urlencode(),
        "query_error": error,
        "params": {key: request.GET.get(key, "") for key in RUN_FILTERS},
        "sorts": _sort_choices(filters["sort"]),
        "methods": METHOD_FORMS,
        "catalogue": CATALOGUE,
        "datasets": selectors.dataset_list_for_user(user=request.user),
        "statuses": RunStatus.choices,
    }
    return render(request, "experiments/run_list.html", context, status=400 if error else 200)


def _sort_choices(current: str) -> list[tuple[str, str, bool]]:
    """(value, label, selected) for the sort menu, the current sort always among them."""
    choices = list(SORT_CHOICES)
    if current not in dict(choices):
        choices.append((current, f"Sort: {current[:60]}"))
    return [(value, label, value == current) for value, label in choices]


def _with_cells(runs: list[Run], columns: list[str]) -> list[Run]:
    """Each run with `cells`: its summary numbers under the chosen columns (None: absent)."""
    values = run_search.summary_values_for(run_ids=[run.id for run in runs], keys=columns)
    for run in runs:
        run.cells = [values[run.id].get(key) for key in columns]
    return runs


def _picker_keys(runs: list[Run], columns: list[str]) -> list[str]:
    """What the column picker offers: the shown runs' summary keys and the chosen ones."""
    keys = run_search.summary_keys_for(run_ids=[run.id for run in runs])
    return sorted(set(keys) | set(columns))


def _headers(params: QueryDict, current: run_search.Sort, columns) -> list[dict]:
    """Per column: its label, the link that sorts by it (ascending first, then flipping) and
    aria-sort's value for the current order."""
    headers = []
    for key, label in columns:
        sort = run_search.parse_sort(key)
        state = _sort_state(current, sort)
        following = run_search.Sort(sort.kind, sort.key, descending=state == "ascending")
        query = params.copy()
        query.pop("page", None)
        query["sort"] = run_search.sort_text(following)
        headers.append({"key": key, "label": label, "url": "?" + query.urlencode(), "sort": state})
    return headers


def _sort_state(current: run_search.Sort, column: run_search.Sort) -> str:
    if current.kind == "named":  # newest and oldest are the Created column's two ways
        current = run_search.Sort("field", "created", current.key == "newest")
    if (current.kind, current.key) != (column.kind, column.key):
        return "none"
    return "descending" if current.descending else "ascending"


def _live_url(runs: list[Run]) -> str:
    """The live fragment's URL for the shown runs that are still moving; "" if none is."""
    active = [str(run.id) for run in runs if not run.is_finished]
    return f"{reverse('runs_live')}?ids={','.join(active)}" if active else ""


@login_required
@require_GET
def run_list_live(request):
    """The polled fragment of the runs list: the status, progress and metric cells of the
    runs named by `ids` (the user's only), swapped out of band, and the poller again while
    any of them is active; 286 stops the polling once none is, as the run page does."""
    ids = [int(part) for part in request.GET.get("ids", "").split(",") if part.isdigit()]
    runs = selectors.run_list_for_user(user=request.user).filter(id__in=ids[:PAGE_SIZE])
    runs = list(runs.defer(*RUN_LIST_UNSHOWN).order_by("id"))
    columns = selectors.run_list_columns_for_user(user=request.user)
    live_url = _live_url(runs)
    context = {"runs": _with_cells(runs, columns), "live_url": live_url}
    response = render(request, "experiments/_run_list_live.html", context)
    if not live_url:
        response.status_code = HTMX_STOP_POLLING
    return response


@login_required
@require_POST
def run_list_columns(request):
    """Save the metric columns picked (checked keys, then an added one) and go back to the
    list as it was."""
    keys = request.POST.getlist("columns") + [request.POST.get("add", "").strip()]
    try:
        services.run_list_columns_set(user=request.user, keys=[key for key in keys if key])
    except ValidationError as exc:
        messages.error(request, error_text(exc))
    back = QueryDict(request.POST.get("back", "")[:2000]).urlencode()
    return redirect(f"{reverse('runs')}?{back}" if back else reverse("runs"))
