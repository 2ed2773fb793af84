"""In the browser: the runs list's metric columns (picked, remembered, sorted by a click on
their header) and a queued run's status changing live on the list, under our CSP."""

import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import log_in
from webapp.experiments.models import Run, RunStatus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _names(page) -> list[str]:
    return page.locator("table.runs tbody tr td:nth-child(2) > a").all_inner_texts()


def test_pick_a_metric_column_sort_by_it_and_watch_a_status(watched, live_server, make_run):
    page = watched
    make_run(name="low", status=RunStatus.SUCCEEDED, summary={"eval_exact_match": 0.2})
    make_run(name="high", status=RunStatus.SUCCEEDED, summary={"eval_exact_match": 0.7})
    waiting = make_run(name="waiting", status=RunStatus.QUEUED)
    log_in(page, live_server, "bob", "bob-pw-9")

    page.click("details.column-picker summary")
    page.check("input[name=columns][value=eval_exact_match]")
    page.uncheck("input[name=columns][value=eval_loss]")
    page.click("details.column-picker button[type=submit]")
    page.wait_for_selector("th a.sort:text-is('eval_exact_match')")
    page.click("th a.sort:text-is('eval_exact_match')")
    page.wait_for_url("**sort=eval_exact_match")
    assert _names(page) == ["low", "high", "waiting"]  # none: last
    page.click("th a.sort:has-text('eval_exact_match')")
    page.wait_for_url("**sort=-eval_exact_match")
    assert _names(page) == ["high", "low", "waiting"]
    header = page.locator("th:has(a.sort:has-text('eval_exact_match'))")
    assert header.get_attribute("aria-sort") == "descending"

    status = page.locator(f"#run-{waiting.id}-status")
    assert status.inner_text() == "Queued"
    Run.objects.filter(id=waiting.id).update(
        status=RunStatus.SUCCEEDED, step=5, summary={"eval_exact_match": 0.5}
    )
    expect(status).to_have_text("Succeeded", timeout=10_000)  # polled every 3 s
    assert page.locator(f"#run-{waiting.id}-m0").inner_text() == "0.5"
    assert page.locator("#runs-live").get_attribute("hx-get") is None  # polling has stopped
    assert page.problems == []
