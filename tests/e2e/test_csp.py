"""Under the Content-Security-Policy every page still works in Chromium: Plotly draws, htmx
swaps its partials, the delete buttons ask first, and the browser reports no violation."""

import pytest

from tests.e2e.conftest import log_in
from webapp.experiments import leases, metrics
from webapp.experiments.models import Run, RunStatus, Sweep

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# Chromium logs a refused script or style as a console error; the event gives the directive.
REPORT_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (e) =>
  console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || "inline"} at ${location.pathname} ${e.sourceFile}:${e.lineNumber}:${e.columnNumber}`));
"""


@pytest.fixture
def watched(page):
    """The page, with every console error or warning and uncaught exception in page.problems."""
    page.problems = []
    page.add_init_script(REPORT_VIOLATIONS)
    page.on("console", lambda m: _is_problem(m) and page.problems.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda exc: page.problems.append(f"exception: {exc}"))
    return page


def _is_problem(message) -> bool:
    # Chromium's software WebGL (no GPU here) notes its own slowness: not the page's doing.
    return message.type in ("error", "warning") and "GL Driver Message" not in message.text


def _run(cast, *, name: str, status: str = RunStatus.SUCCEEDED, sweep=None) -> Run:
    run = Run.objects.create(
        project=cast.acme_project,
        sweep=sweep,
        name=name,
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
        method="lora",
        train_config={"steps": 3, "learning_rate": 1e-3},
        total_steps=3,
    )
    fence = leases.run_claim(run_id=run.id, worker="w")
    points = [metrics.Point("train_loss", s, 3.0 - s / 2, 100.0 + s) for s in (1, 2)]
    metrics.metrics_record(run_id=run.id, fence=fence, points=points)
    Run.objects.filter(id=run.id).update(step=2)
    if status != RunStatus.RUNNING:
        profile = {"trainable_params": 1234, "overhead": 1.1, "mergeable": True}
        summary = {"eval_loss": 1.5, "base_eval_loss": 2.0}
        leases.run_finish(
            run_id=run.id, fence=fence, status=status, summary=summary, profile=profile
        )
    return run


def _visit(page, url: str) -> None:
    response = page.goto(url)
    assert response.status == 200, url
    assert "script-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_load_state("networkidle")


def test_pages_work_under_the_policy(watched, live_server, cast):
    page, base = watched, live_server.url
    done = _run(cast, name="finished lora")
    other = _run(cast, name="finished ia3")
    sweep = Sweep.objects.create(
        project=cast.acme_project, name="grid", base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
    )  # fmt: skip
    swept = _run(cast, name="swept lora", status=RunStatus.RUNNING, sweep=sweep)
    _visit(page, f"{base}/login/")
    log_in(page, live_server, "alice", "alice-pw-9")

    _visit(page, f"{base}/runs/{done.id}/")
    page.wait_for_selector("#loss-chart .main-svg")

    _visit(page, f"{base}/compare/?runs={done.id},{other.id}")
    for chart in ("curves", "scatter", "parcoords"):
        page.wait_for_selector(f"#{chart} .main-svg")
    page.select_option("#curve-x", "wall")  # compare.js redraws on input
    page.wait_for_selector("#curves .xtitle >> text=wall time (s)")

    # A live run: htmx polls its partial, run.js redraws the chart after each swap.
    _visit(page, f"{base}/runs/{swept.id}/")
    Run.objects.filter(id=swept.id).update(step=3)
    page.wait_for_selector("#live >> text=Step 3 of 3", timeout=10_000)
    page.wait_for_selector("#loss-chart .main-svg")

    _visit(page, f"{base}/sweeps/{sweep.id}/")
    Run.objects.filter(id=swept.id).update(status=RunStatus.SUCCEEDED)
    page.wait_for_selector("#sweep-runs >> text=Succeeded", timeout=10_000)

    _visit(page, f"{base}/runs/new/")
    fields = page.locator("#method-fields").inner_html()
    page.select_option("select[name=method]", "ia3")
    page.wait_for_function(
        "html => document.querySelector('#method-fields').innerHTML !== html", arg=fields
    )

    _visit(page, f"{base}/datasets/{cast.datasets['sample-instructions'].id}/")

    _visit(page, f"{base}/api/v1/docs/")  # Swagger UI, started by a script file
    page.wait_for_selector(".swagger-ui .opblock")
    assert page.problems == []


def test_the_listener_sees_a_refused_inline_script(watched, live_server, cast):
    """Guards the test above: an inline script is refused, and that is reported."""
    _visit(watched, f"{live_server.url}/login/")
    watched.evaluate(
        "() => { const s = document.createElement('script');"
        " s.textContent = 'window.ran = true'; document.body.append(s); }"
    )
    watched.wait_for_timeout(200)
    assert watched.evaluate("window.ran") is None
    assert any("CSP violation: script-src" in p for p in watched.problems), watched.problems


def test_delete_asks_first_cancel_keeps_the_run_and_the_share_link_selects_itself(
    watched, live_server, cast
):
    run = _run(cast, name="keep me")
    log_in(watched, live_server, "alice", "alice-pw-9")
    _visit(watched, f"{live_server.url}/runs/{run.id}/")
    watched.click("text=Delete run")  # the conftest's page dismisses every dialog
    watched.wait_for_timeout(300)
    assert watched.dialogs == ["Delete this run, its metrics and its adapter?"]
    assert watched.url == f"{live_server.url}/runs/{run.id}/"
    assert Run.objects.filter(id=run.id).exists()
    # The share link's field selects its whole value on a click, ready to copy.
    watched.click("form.share-form button")
    watched.click("input.share-url")
    selected = watched.evaluate("() => String(window.getSelection())")
    assert selected == watched.input_value("input.share-url")
    assert watched.problems == []
