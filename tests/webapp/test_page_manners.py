"""Issue 18, item 5's page manners: a run's one colour on every page, the share view without
the worker's host:pid, copy buttons beside the links shown once, the log that follows."""

import re

import pytest
from django.test import Client
from django.urls import reverse

from tests.webapp.test_compare_confidence import seeded_sweep
from webapp.experiments.colors import RUN_COLORS, run_color
from webapp.experiments.models import Run, RunStatus

pytestmark = pytest.mark.django_db

SHARE_URL = re.compile(r'value="(http://testserver/s/pls_[A-Za-z0-9_-]+/)"')
WORKER = "celery@gpu-host-7:4242"


def _page(client, url, **params) -> str:
    response = client.get(url, params)
    assert response.status_code == 200, url
    return response.content.decode()


def test_a_run_has_one_colour_on_every_page(client, cast):
    sweep, runs = seeded_sweep(cast, methods=("lora",), seeds=2)
    run = runs[1]
    colour = run_color(run.id)
    assert colour in RUN_COLORS
    client.force_login(cast.bob)
    run_page = _page(client, reverse("run_detail", args=[run.id]))
    assert (
        f'id="loss-chart" class="chart" aria-label="loss curve" data-color="{colour}"' in run_page
    )
    # the loss chart, the task metrics' chart and the 3 system charts
    assert run_page.count(f'data-color="{colour}"') == 5
    compare = client.get(reverse("compare"), {"sweep": sweep.id})
    payload = compare.context["payload"]
    assert next(r["color"] for r in payload["runs"] if r["id"] == run.id) == colour
    sweep_page = _page(client, reverse("sweep_detail", args=[sweep.id]))
    assert f"background: {colour}" in sweep_page
    assert f"background: {run_color(runs[0].id)}" in sweep_page


def _lost_once(run: Run) -> Run:
    reason = f"worker {WORKER} stopped sending heartbeats at 10:00:00 UTC"
    Run.objects.filter(id=run.id).update(
        worker=WORKER,
        error=f"{reason}; gave up after 3 attempts",
        log=f"step 1 loss 2.0\nlost: {reason}; sent again (attempt 2 of 3)\nstep 5 loss 1.1",
        status=RunStatus.FAILED,
    )
    run.refresh_from_db()
    return run


def test_the_share_view_hides_the_workers_host_and_pid(client, cast):
    sweep, runs = seeded_sweep(cast, methods=("lora",), seeds=2)
    run = _lost_once(runs[0])
    client.force_login(cast.bob)
    own = _page(client, reverse("run_detail", args=[run.id]))
    assert WORKER in own and "gpu-host-7" in own  # the team sees where it ran
    created = client.post(reverse("run_share", args=[run.id]), {"days": "7"}).content.decode()
    shared = _page(Client(), SHARE_URL.search(created).group(1))
    assert "gpu-host-7" not in shared and "4242" not in shared
    assert "lost: the worker stopped sending heartbeats" in shared
    live = Client().get(SHARE_URL.search(created).group(1) + "live/")
    assert live.status_code == 286 and "gpu-host-7" not in live.content.decode()
    run.refresh_from_db()  # the page hid them; the row keeps them
    assert (run.worker, run.lineage["host"]) == (WORKER, "gpu-host-7")
    assert WORKER in run.error and WORKER in run.log

    ids = [r.id for r in runs]
    created = client.post(reverse("compare_share"), {"runs": ids, "days": "1"}).content.decode()
    compare = _page(Client(), SHARE_URL.search(created).group(1))
    assert "Lineage" in compare and "gpu-host-7" not in compare
    assert "gpu-host-7" in _page(client, reverse("compare"), runs=ids)


def test_links_shown_once_have_a_copy_button(client, cast, make_run):
    client.force_login(cast.alice)
    run = make_run(status=RunStatus.SUCCEEDED)
    pages = [
        client.post(reverse("run_share", args=[run.id]), {"days": "7"}),
        client.post(reverse("api_tokens"), {"name": "laptop"}),
        client.post(reverse("team_invite", args=[cast.acme.id]), {"role": "member"}),
    ]
    for response, field in zip(pages, ("share-url", "token-secret", "invite-url"), strict=True):
        page = response.content.decode()
        assert f'<button type="button" data-copy="{field}">Copy</button>' in page, field
        assert f'id="{field}"' in page
        assert "onclick" not in page  # the policy refuses inline handlers: page.js copies


def test_the_run_log_is_marked_for_the_script_that_follows_it(client, cast, make_run):
    run = make_run(status=RunStatus.RUNNING, log="step 1\nstep 2")
    client.force_login(cast.bob)
    page = _page(client, reverse("run_detail", args=[run.id]))
    assert '<pre class="log" id="run-log"' in page
    assert 'hx-get="' in page  # polled while running: run.js keeps its place across swaps
