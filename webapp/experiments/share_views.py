"""Read-only pages behind a share link: no login, the 256-bit secret in the URL is the key.

An unknown, revoked or expired secret answers 404, like any page of another team. The pages
send no Referer onwards and ask caches and robots to keep out, so the secret stays in the
hands it was given to.
"""

import re

from csp.decorators import csp_update
from django.http import Http404
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from django_htmx.http import HTMX_STOP_POLLING

from webapp.experiments import selectors
from webapp.experiments.lineage import public_lineage
from webapp.experiments.metric_files import metrics_file_response
from webapp.experiments.models import EXTERNAL_WORKER, ShareScope
from webapp.experiments.pages import (
    PLOTLY_WEBGL_CSP,
    adapter_response,
    compare_context,
    merged_panel,
    merged_response,
    requested_version,
    run_page_context,
)

# A worker named in a run's error or log ("lost: worker celery@gpu-7:4242 stopped sending
# heartbeats"): its host and process id are the team's, not the link holder's.
WORKER_NAMED = re.compile(r"\bworker [^\s;,]+:\d+")


def _public(run):
    """The run as a share link shows it: no worker host:pid (its field, its error and log,
    where a lost attempt names it) and no host in its lineage. Changes this page's copy of
    the row only; it is never saved."""
    if run.worker != EXTERNAL_WORKER:
        run.worker = ""
    run.error = WORKER_NAMED.sub("the worker", run.error)
    run.log = WORKER_NAMED.sub("the worker", run.log)
    run.lineage = public_lineage(run.lineage)
    run.save = _never_saved
    return run


def _never_saved(*args, **kwargs):
    raise RuntimeError("A share link's copy of a run hides some of its fields: never saved.")


def _private(response):
    response["Referrer-Policy"] = "no-referrer"
    response["X-Robots-Tag"] = "noindex, nofollow"
    return response


def _shared_run(secret: str):
    link = selectors.share_link_resolve(secret=secret)
    runs = selectors.share_link_runs(link=link)
    if link.scope != ShareScope.RUN or not runs:
        raise Http404("Not found")
    return _public(runs[0])


def _run_context(secret: str) -> dict:
    run = _shared_run(secret)
    urls = {
        "page_url": reverse("share_view", args=[secret]),
        "live_url": reverse("share_live", args=[secret]),
        "download_url": reverse("share_adapter", args=[secret]),
        "metrics_csv_url": reverse("share_metrics_csv", args=[secret]),
        "metrics_parquet_url": reverse("share_metrics_parquet", args=[secret]),
        "merged_url": reverse("share_merged", args=[secret]),
        "merged_status_url": reverse("share_merged_status", args=[secret]),
    }
    return run_page_context(run, urls=urls) | {"shared": True}


@never_cache
@require_GET
@csp_update(PLOTLY_WEBGL_CSP)  # a shared comparison draws the WebGL chart
def shared(request, secret: str):
    link = selectors.share_link_resolve(secret=secret)
    if link.scope == ShareScope.RUN:
        response = render(request, "experiments/run_detail.html", _run_context(secret))
    else:
        runs = [_public(run) for run in selectors.share_link_runs(link=link)]
        context = compare_context(runs, metric=request.GET.get("metric")) | {
            "shared": True,
            "link": link,
            "kept_query": [],
        }
        response = render(request, "experiments/compare.html", context)
    return _private(response)


@never_cache
@require_GET
def shared_live(request, secret: str):
    context = _run_context(secret)
    response = render(request, "experiments/run_detail.html#live", context)
    if context["run"].is_finished:
        response.status_code = HTMX_STOP_POLLING
    return _private(response)


@never_cache
@require_GET
def shared_adapter(request, secret: str):
    run = _shared_run(secret)
    return _private(adapter_response(run, version=requested_version(request)))


@never_cache
@require_GET
def shared_merged(request, secret: str):
    """The merged model; the first request queues its build (a share link's page has no
    forms: it only derives what the shared run already holds, once per run)."""
    page_url = reverse("share_view", args=[secret])
    run, version = _shared_run(secret), requested_version(request)
    return _private(merged_response(run, page_url=page_url, version=version))


@never_cache
@require_GET
def shared_merged_status(request, secret: str):
    return _private(merged_panel(request, _run_context(secret)))


@never_cache
@require_GET
def shared_metrics_file(request, secret: str, fmt: str):
    """The shared run's metric points, as its page charts them but every one of them."""
    return _private(metrics_file_response(_shared_run(secret), fmt))
