"""In the browser (issue 18, items 2 and 5): the compare page of a 3-seed sweep of LoRA and
DoRA (runs written straight to the database, nothing trained) shows each configuration's
interval and marks the overlap; its share link's Copy button puts the link on the
clipboard; the run log follows its newest line until the reader scrolls up."""

import pytest

from tests.e2e.conftest import log_in
from tests.webapp.test_compare_confidence import seeded_sweep
from webapp.experiments.models import Run, RunStatus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _problems(page) -> list[str]:
    problems = []
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    return problems


def test_compare_a_three_seed_sweep_and_copy_its_share_link(browser, live_server, cast):
    sweep, _ = seeded_sweep(cast, methods=("lora", "dora"), seeds=3)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server.url)
    page = context.new_page()
    problems = _problems(page)
    log_in(page, live_server, "alice", "alice-pw-9")
    page.goto(f"{live_server.url}/compare/?sweep={sweep.id}")
    page.wait_for_selector("#scatter .main-svg")
    page.wait_for_selector("#parcoords .main-svg")

    rows = page.locator("table.tradeoff tbody tr")
    assert rows.count() == 2  # two configurations, not six runs
    table = page.locator("table.tradeoff").inner_text()
    assert "0.610 ± 0.099 (3 seeds)" in table and "0.590 ± 0.099 (3 seeds)" in table
    assert "no clear difference from seeded · lora" in table
    line = page.locator("#recommendation").inner_text()
    assert "LoRA, eval_exact_match 0.610 ± 0.099 (3 seeds) — no clear difference from DoRA" in line
    # One point per configuration, with its interval as error bars.
    assert page.locator("#scatter .scatterlayer .trace").count() == 2
    assert page.locator("#scatter .errorbar").count() == 2

    page.click("form.share-form button")
    page.wait_for_selector("input.share-url")
    page.click("button[data-copy=share-url]")
    page.wait_for_selector("button[data-copy=share-url] >> text=Copied")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == page.input_value("input.share-url")
    assert copied.startswith(f"{live_server.url}/s/pls_")
    assert problems == []
    context.close()


def _log_at_bottom(page) -> bool:
    return page.evaluate(
        "() => { const l = document.getElementById('run-log');"
        " return l.scrollHeight - l.scrollTop - l.clientHeight < 8; }"
    )


def test_the_run_log_follows_its_newest_line_until_the_reader_scrolls_up(
    page, live_server, cast, make_run
):
    lines = [f"step {i} loss {3 - i / 100:.2f}" for i in range(1, 61)]
    run = make_run(status=RunStatus.RUNNING, step=60, total_steps=100, log="\n".join(lines))
    log_in(page, live_server, "bob", "bob-pw-9")
    page.goto(f"{live_server.url}/runs/{run.id}/")
    page.wait_for_selector("#run-log")
    page.wait_for_function("document.getElementById('run-log').scrollTop > 0")
    assert _log_at_bottom(page)

    # New lines arrive: the log follows.
    Run.objects.filter(id=run.id).update(log="\n".join([*lines, "step 61 loss 2.39"]))
    page.wait_for_selector("#run-log >> text=step 61 loss 2.39", timeout=10_000)
    page.wait_for_function(
        "() => { const l = document.getElementById('run-log');"
        " return l.scrollHeight - l.scrollTop - l.clientHeight < 8; }"
    )

    # The reader scrolls up: the next lines leave them where they are.
    page.evaluate("document.getElementById('run-log').scrollTop = 40")
    Run.objects.filter(id=run.id).update(log="\n".join([*lines, "step 61", "step 62 loss 2.38"]))
    page.wait_for_selector("#run-log >> text=step 62 loss 2.38", timeout=10_000)
    # (A swapped-in log starts at its top; run.js then puts it back once the swap settles.)
    page.wait_for_function("document.getElementById('run-log').scrollTop === 40", timeout=3000)
