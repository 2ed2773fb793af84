"""A run and a tag named like a script stay text in every page and in Plotly's hover labels."""

import pytest

from tests.e2e.conftest import log_in
from webapp.experiments import leases, metrics
from webapp.experiments.models import Run, RunStatus, Tag

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

XSS = "<img src=x onerror=alert(1)>"


def _finished_run(cast) -> Run:
    run = Run.objects.create(
        project=cast.acme_project,
        name=XSS,
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
        method="lora",
        train_config={"steps": 3},
        total_steps=3,
    )
    fence = leases.run_claim(run_id=run.id, worker="w")
    points = [metrics.Point("train_loss", s, 3.0 - s / 2, 100.0 + s) for s in (1, 2, 3)]
    metrics.metrics_record(run_id=run.id, fence=fence, points=points)
    profile = {"trainable_params": 1234, "overhead": 1.1, "mergeable": True, "adapter_bytes": 9}
    leases.run_finish(
        run_id=run.id,
        fence=fence,
        status=RunStatus.SUCCEEDED,
        summary={"eval_loss": 1.5, "base_eval_loss": 2.0},
        profile=profile,
    )
    Tag.objects.create(run=run, name=XSS)
    return run


def test_script_names_are_text_in_pages_and_hover_labels(page, live_server, cast):
    run = _finished_run(cast)
    log_in(page, live_server, "alice", "alice-pw-9")
    for path in ["/", f"/runs/{run.id}/", f"/compare/?runs={run.id}"]:
        page.goto(live_server.url + path)
        page.wait_for_load_state("networkidle")
        assert page.locator("img[src=x]").count() == 0, path
        assert XSS in page.locator("main").inner_text(), path
    # Show the hover label of the run's point as a pointer would.
    page.evaluate("Plotly.Fx.hover('scatter', [{curveNumber: 0, pointNumber: 0}])")
    hover = page.locator("#scatter .hoverlayer .hovertext")
    hover.wait_for()
    assert XSS in hover.text_content()
    page.evaluate("Plotly.Fx.hover('curves', [{curveNumber: 0, pointNumber: 1}])")
    curve_hover = page.locator("#curves .hoverlayer .hovertext")
    curve_hover.wait_for()
    assert XSS in curve_hover.text_content()
    assert page.locator("svg img, svg foreignObject").count() == 0
    assert page.dialogs == []
