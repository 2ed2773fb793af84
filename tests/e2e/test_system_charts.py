"""In Chromium, the run page's System section draws the sampled sys/ series in their own
charts (and hides the GPU ones on a machine without GPUs), beside an unchanged loss chart;
the compare page's lineage table marks what differs."""

import pytest

from tests.e2e.conftest import log_in
from webapp.experiments import leases, metrics
from webapp.experiments.models import Run, RunStatus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _run(cast, name: str, torch_version: str) -> Run:
    run = Run.objects.create(
        project=cast.acme_project,
        name=name,
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
        method="lora",
        train_config={"steps": 3},
        total_steps=3,
    )
    fence = leases.run_claim(run_id=run.id, worker="w")
    points = [metrics.Point("train_loss", s, 3.0 - s / 2, 100.0 + s) for s in (1, 2, 3)]
    points += [metrics.Point("sys/cpu_percent", s, 150.0 + s, 100.0 + s) for s in (1, 3)]
    points += [metrics.Point("sys/rss_mib", s, 800.0 + s, 100.0 + s) for s in (1, 3)]
    metrics.metrics_record(run_id=run.id, fence=fence, points=points)
    Run.objects.filter(id=run.id).update(lineage={"torch": torch_version, "python": "3.11.2"})
    leases.run_finish(run_id=run.id, fence=fence, status=RunStatus.SUCCEEDED)
    return run


def test_the_system_section_draws_what_was_sampled(page, live_server, cast):
    problems = []
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    run = _run(cast, "sampled", "2.10.0")
    other = _run(cast, "older torch", "2.9.1")
    page.goto(f"{live_server.url}/login/")
    log_in(page, live_server, "alice", "alice-pw-9")

    page.goto(f"{live_server.url}/runs/{run.id}/")
    page.wait_for_selector("#loss-chart .main-svg")
    page.wait_for_selector("#sys-usage-chart .main-svg")
    page.wait_for_selector("#sys-memory-chart .main-svg")
    assert page.is_visible("#system") and page.is_hidden("#sys-power-chart")  # no GPU power
    traces = "id => document.getElementById(id).data.map(t => [t.name, t.y])"
    assert page.evaluate(traces, "sys-usage-chart") == [["CPU (100 = one core)", [151, 153]]]
    assert page.evaluate(traces, "sys-memory-chart") == [["RSS (training processes)", [801, 803]]]
    assert page.evaluate(traces, "loss-chart") == [["train loss", [2.5, 2, 1.5]]]
    # Each drawn in its own cell of the section's grid, not over the next one.
    fits = "id => { const e = document.getElementById(id); return e.querySelector('.main-svg')"
    fits += ".getBoundingClientRect().right <= e.getBoundingClientRect().right + 1; }"
    assert page.evaluate(fits, "sys-usage-chart") and page.evaluate(fits, "sys-memory-chart")
    page.click("details.lineage summary")
    assert page.is_visible("details.lineage >> text=2.10.0")

    page.goto(f"{live_server.url}/compare/?runs={run.id},{other.id}")
    assert page.locator("table.lineage th.diff").all_inner_texts() == ["torch"]
    assert problems == []
