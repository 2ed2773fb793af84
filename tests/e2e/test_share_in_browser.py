"""In the browser: a member comments on a run, shares it, and a person without an account
opens the link in a fresh browser context, sees the curve, downloads the adapter; after the
revocation the same link is not found."""

import pytest

from tests.e2e.conftest import log_in
from tests.e2e.test_xss import _finished_run
from webapp.experiments import leases
from webapp.experiments.models import Run, RunStatus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _with_adapter(run: Run) -> Run:
    Run.objects.filter(id=run.id).update(status=RunStatus.QUEUED)
    fence = leases.run_claim(run_id=run.id, worker="w")
    leases.artifact_store(
        run_id=run.id, fence=fence, kind="adapter", name="adapter_config.json", data=b"{}"
    )
    leases.run_finish(run_id=run.id, fence=fence, status=RunStatus.SUCCEEDED)
    return run


def test_share_a_run_with_someone_outside_the_team(page, browser, live_server, cast):
    run = _with_adapter(_finished_run(cast))
    Run.objects.filter(id=run.id).update(name="shared lora run")
    log_in(page, live_server, "bob", "bob-pw-9")
    page.goto(f"{live_server.url}/runs/{run.id}/")
    page.fill("textarea[name=body]", "loss looks good")
    page.click("form.comment-form button")
    assert page.locator(".comment p").inner_text() == "loss looks good"
    page.click("form.share-form button")
    url = page.input_value("input.share-url")
    assert url.startswith(f"{live_server.url}/s/pls_")

    stranger = browser.new_context(viewport={"width": 390, "height": 844})  # a phone
    visit = stranger.new_page()
    assert visit.goto(url).status == 200
    assert visit.locator("h1").inner_text() == "shared lora run"
    visit.wait_for_selector("#loss-chart .main-svg")  # Plotly drew the curve
    assert visit.locator("textarea, form.share-form, #comments").count() == 0
    assert "loss looks good" not in visit.content()
    with visit.expect_download() as download:
        visit.click("text=Download adapter")
    assert download.value.suggested_filename.endswith(".zip")

    page.goto(f"{live_server.url}/runs/{run.id}/")
    page.click("form.share-link button")
    assert visit.goto(url).status == 404
    stranger.close()
