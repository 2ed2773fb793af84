"""What the pages and the API show of system metrics and lineage: the run page's System
charts and Lineage list, the compare page's lineage table with differing rows highlighted
(the API's `lineage`: tests/api/test_api_lineage.py)."""

import json
import re

import pytest
from django.urls import reverse

from webapp.experiments import metrics
from webapp.experiments.metrics import Point
from webapp.experiments.models import RunStatus

pytestmark = pytest.mark.django_db

LINEAGE = {
    "python": "3.11.2",
    "torch": "2.10.0+cpu",
    "transformers": "5.24.0",
    "peft_core": "0.1.0",
    "git_sha": "0123456789abcdef0123456789abcdef01234567",
    "gpu": "cpu",
    "gpu_count": 0,
    "host": "trainer-1",
    "seed": 5,
    "dataset_sha256": "ab" * 32,
}


def _points(run, key: str, values: list[float]) -> None:
    """Stored as a worker stores them (the COPY path and its rollups, which the page reads)."""
    points = [Point(key, step, value, 1000.0 + step) for step, value in enumerate(values, 1)]
    metrics.metrics_record(run_id=run.id, fence=run.fence, points=points)


def test_the_run_page_charts_system_metrics_and_lists_the_lineage(client, cast, make_run):
    run = make_run(status=RunStatus.RUNNING, fence=1, lineage=LINEAGE)
    _points(run, "train_loss", [2.0, 1.5, 1.2])
    _points(run, "sys/cpu_percent", [180.0, 190.0, 170.0])
    _points(run, "sys/rss_mib", [900.0, 950.0, 960.0])
    client.force_login(cast.bob)
    response = client.get(reverse("run_detail", args=[run.id]))
    page = response.content.decode()

    series = response.context["series"]
    assert series["sys/cpu_percent"] == {"step": [1, 2, 3], "value": [180.0, 190.0, 170.0]}
    assert series["sys/rss_mib"]["value"] == [900.0, 950.0, 960.0]
    drawn = json.loads(re.search(r'id="metrics-data"[^>]*>(.*?)</script>', page, re.S)[1])
    charts = {m["key"]: m["chart"] for m in drawn}
    assert charts["train_loss"] == "loss"  # the loss chart keeps its series
    assert charts["sys/cpu_percent"] == charts["sys/gpu0/util_percent"] == "sys-usage"
    assert charts["sys/rss_mib"] == charts["sys/gpu7/mem_mib"] == "sys-memory"
    assert charts["sys/gpu0/power_w"] == "sys-power"
    for chart in ("loss", "sys-usage", "sys-memory", "sys-power"):
        assert f'id="{chart}-chart"' in page
    assert '<section class="card" id="system" hidden>' in page  # run.js shows it with data

    lineage = page[page.index('<details class="lineage">') : page.index("</details>")]
    assert "<dt>torch</dt><dd><code>2.10.0+cpu</code></dd>" in lineage
    assert "<dt>Code (git commit)</dt><dd><code>0123456789abcdef" in lineage
    assert "<dt>Dataset sha256</dt><dd><code>" + "ab" * 32 in lineage
    assert lineage.index("Python") < lineage.index("torch") < lineage.index("Host")


def test_a_run_without_lineage_shows_none(client, cast, make_run):
    run = make_run()
    client.force_login(cast.bob)
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert '<details class="lineage">' not in page


def test_compare_highlights_the_lineage_that_differs(client, cast, make_run):
    a = make_run(name="run a", lineage=LINEAGE)
    b = make_run(name="run b", lineage=LINEAGE | {"torch": "2.9.1+cu128", "cuda": "12.8"})
    client.force_login(cast.alice)
    response = client.get(reverse("compare"), {"runs": [a.id, b.id]})
    rows = {label: (values, differs) for label, values, differs in response.context["lineage_rows"]}
    assert rows["torch"] == (["2.10.0+cpu", "2.9.1+cu128"], True)
    assert rows["CUDA (torch built for)"] == (["—", "12.8"], True)  # recorded by one run only
    assert rows["Python"] == (["3.11.2", "3.11.2"], False)
    assert rows["Seed"] == ([5, 5], False)

    page = response.content.decode()
    table = page[page.index('<table class="table lineage">') :]
    table = table[: table.index("</table>")]
    assert '<th class="diff">torch</th><td class="diff"><code>2.10.0+cpu</code></td>' in table
    assert "<th>Python</th><td><code>3.11.2</code></td>" in table


def test_compare_without_lineage_has_no_lineage_table(client, cast, make_run):
    a, b = make_run(name="run a"), make_run(name="run b")
    client.force_login(cast.alice)
    response = client.get(reverse("compare"), {"runs": [a.id, b.id]})
    assert response.context["lineage_rows"] == []
    assert '<table class="table lineage">' not in response.content.decode()
