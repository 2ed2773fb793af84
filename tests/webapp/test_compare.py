"""Sweeps, the runs list's filters and the compare page with its CSV."""

import csv
import io
import re

import pytest
from django.urls import reverse

from webapp.experiments import leases, metrics
from webapp.experiments.comparison import csv_cell
from webapp.experiments.forms import parse_grid
from webapp.experiments.method_forms import METHOD_FORMS, expand_sweep
from webapp.experiments.models import Run, RunStatus, Sweep, Tag

pytestmark = pytest.mark.django_db

XSS = "<img src=x onerror=alert(1)>"


def _sweep_form(cast, **fields) -> dict:
    data = {
        "name": "shoot-out",
        "project": cast.acme_project.id,
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "methods": ["lora"],
        "grid": "lora.r = 4, 8, 16",
        "steps": 5,
        "batch_size": 2,
        "learning_rate": 1e-3,
        "max_length": 64,
        "eval_every": 0,
    }
    return {**data, **fields}


def _finished_run(cast, name: str, method: str = "lora", **profile) -> Run:
    run = Run.objects.create(
        project=cast.acme_project,
        name=name,
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
        method=method,
        method_config={"r": 8},
        train_config={"steps": 3, "learning_rate": 1e-3},
        total_steps=3,
    )
    fence = leases.run_claim(run_id=run.id, worker="w")
    points = [metrics.Point("train_loss", s, 3.0 - s * 0.5, 10.0 + s) for s in (1, 2, 3)]
    points += [metrics.Point("tokens", s, 100.0 * s, 10.0 + s) for s in (1, 2, 3)]
    metrics.metrics_record(run_id=run.id, fence=fence, points=points)
    leases.run_finish(
        run_id=run.id,
        fence=fence,
        status=RunStatus.SUCCEEDED,
        summary={"eval_loss": 1.5, "base_eval_loss": 2.5},
        profile={
            "trainable_params": 1000,
            "trainable_percent": 0.5,
            "overhead": 1.2,
            "base_ms": 10.0,
            "merged_ms": 10.1,
            "mergeable": True,
            "adapter_bytes": 4000,
            "peak_memory_mb": 12.0,
            **profile,
        },
    )
    return run


def test_grid_parsing_and_expansion():
    assert parse_grid("lora.r = 4, 8\n\nlora.alpha=16") == {
        "lora.r": ["4", "8"],
        "lora.alpha": ["16"],
    }
    with pytest.raises(ValueError, match="Line 1"):
        parse_grid("r = 4")
    items = expand_sweep(["lora"], {"lora.r": ["4", "8"], "lora.alpha": ["8", "32"]})
    assert [(i.config["r"], i.config["alpha"]) for i in items] == [(4, 8), (4, 32), (8, 8), (8, 32)]
    assert items[0].label == "lora r=4 alpha=8"


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"lora.r": ["0"]}, "r"),
        ({"lora.rank": ["4"]}, "has no field"),
        ({"dora.r": ["4"]}, "not among the chosen"),
    ],
)
def test_bad_grids_are_refused(grid, message):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match=message):
        expand_sweep(["lora"], grid)


def test_sweep_launches_one_run_per_grid_point(client, cast):
    client.force_login(cast.bob)
    response = client.post(reverse("sweep_new"), _sweep_form(cast))
    sweep = Sweep.objects.get()
    assert response.status_code == 302
    runs = list(sweep.runs.order_by("id"))
    assert [r.method_config["r"] for r in runs] == [4, 8, 16]
    assert all(r.status == RunStatus.QUEUED and r.train_config["steps"] == 5 for r in runs)
    page = client.get(reverse("sweep_detail", args=[sweep.id])).content.decode()
    assert "shoot-out · lora r=16" in page and 'hx-trigger="every 3s"' in page


def test_sweep_with_a_bad_grid_creates_nothing(client, cast):
    client.force_login(cast.alice)
    response = client.post(reverse("sweep_new"), _sweep_form(cast, grid="lora.r = 4, 0"))
    assert response.status_code == 400
    assert "grid" in response.context["form"].errors
    assert not Sweep.objects.exists() and not Run.objects.exists()


def test_clone_prefills_the_form(client, cast):
    client.force_login(cast.alice)
    client.post(reverse("sweep_new"), _sweep_form(cast))
    sweep = Sweep.objects.get()
    form = client.get(reverse("sweep_new"), {"clone": sweep.id}).context["form"]
    assert form.initial["grid"] == "lora.r = 4, 8, 16"
    assert form.initial["steps"] == 5 and form.initial["methods"] == ["lora"]
    client.force_login(cast.mallory)
    assert client.get(reverse("sweep_new"), {"clone": sweep.id}).status_code == 404
    assert client.get(reverse("sweep_detail", args=[sweep.id])).status_code == 404


ALL_PLACEMENTS = "bottleneck.placement = houlsby, pfeiffer, parallel"


def test_the_preset_button_keeps_what_was_typed(client, cast):
    """Chosen on a filled-in form, the preset checks every method; the rest stays as typed,
    and a field left empty gets the preset's value."""
    client.force_login(cast.alice)
    typed = _sweep_form(cast, name="my shoot-out", steps=7, grid="", preset="all-methods")
    response = client.post(reverse("sweep_new"), typed)
    assert response.status_code == 200 and not Sweep.objects.exists()
    initial = response.context["form"].initial
    assert initial["methods"] == list(METHOD_FORMS)
    assert (initial["name"], initial["base_model"], initial["steps"]) == (
        "my shoot-out",
        "tiny-llama",
        "7",
    )
    assert initial["dataset"] == str(cast.datasets["sample-instructions"].id)
    assert initial["grid"] == ALL_PLACEMENTS  # it was empty
    page = response.content.decode()
    assert 'value="my shoot-out"' in page and '<option value="tiny-llama" selected>' in page
    assert len(re.findall(r'name="methods" value="\w+"[^>]* checked', page)) == len(METHOD_FORMS)

    kept = client.post(reverse("sweep_new"), _sweep_form(cast, preset="all-methods"))
    assert kept.context["form"].initial["grid"] == "lora.r = 4, 8, 16"  # a typed grid stays


def test_the_preset_is_a_button_of_the_form(client, cast):
    """A button, so what was typed travels with it; Enter in a field still launches."""
    client.force_login(cast.alice)
    page = client.get(reverse("sweep_new")).content.decode()
    assert "?preset=" not in page  # no link that drops the form
    start = page.index('<form method="post" class="card')
    form = page[start : page.index("</form>", start)]
    buttons = re.findall(r"<button[^>]*>", form)
    assert 'name="preset" value="all-methods"' in " ".join(buttons)
    assert 'name="preset"' not in buttons[0]  # the form's default button launches


def test_the_preset_link_alone_gives_the_whole_preset(client, cast):
    """The runs list links to ?preset=all-methods: every method on the default model, short."""
    client.force_login(cast.alice)
    initial = client.get(reverse("sweep_new"), {"preset": "all-methods"}).context["form"].initial
    assert initial["methods"] == list(METHOD_FORMS) and initial["grid"] == ALL_PLACEMENTS
    assert (initial["base_model"], initial["steps"]) == ("smollm2-135m-instruct", 20)
    runs_page = client.get(reverse("runs")).content.decode()
    assert reverse("sweep_new") + "?preset=all-methods" in runs_page


def test_runs_list_filters_search_and_sort(client, cast):
    a, b = _finished_run(cast, "alpha run"), _finished_run(cast, "beta run", method="dora")
    Tag.objects.create(run=b, name="baseline")
    client.force_login(cast.alice)

    def names(**params):
        page = client.get(reverse("runs"), params).context["page"]
        return [run.name for run in page.object_list]

    assert names(method="dora") == ["beta run"]
    assert names(tag="baseline") == ["beta run"]
    assert names(q="ALPHA") == ["alpha run"]
    assert names(sort="name") == ["alpha run", "beta run"]
    assert names(status="queued") == []
    assert names(dataset=str(a.dataset_id), sort="oldest") == ["alpha run", "beta run"]


def test_compare_page_shows_every_view_with_measured_numbers(client, cast):
    a, b = _finished_run(cast, "run a"), _finished_run(cast, "run b", trainable_params=50)
    client.force_login(cast.bob)
    response = client.get(reverse("compare"), {"runs": [a.id, b.id]})
    page = response.content.decode()
    for element in (
        'id="curves"',
        'id="scatter"',
        'id="parcoords"',
        "Trade-offs",
        "Hyper-parameters",
    ):
        assert element in page
    payload = response.context["payload"]
    assert payload["curves"][a.id]["train_loss"]["tokens"] == [100.0, 200.0, 300.0]
    assert payload["curves"][a.id]["train_loss"]["wall"] == [0.0, 1.0, 2.0]
    assert [row["trainable_params"] for row in payload["tradeoff"]] == [1000, 50]
    assert payload["tradeoff"][0]["merged_overhead"] == pytest.approx(1.01)


@pytest.mark.parametrize(
    ("mib", "kind", "text"),
    [
        (0.0, "rss", "—"),  # RSS did not grow: nothing measured, not "0 MiB"
        (None, None, "—"),  # an uploaded adapter: trained elsewhere
        (0.04, "rss", "&lt;0.1 MiB"),
        (0.42, "rss", "0.4 MiB"),
        (12.0, "cuda", "12 MiB"),
        (20_480.4, "cuda", "20,480 MiB"),
    ],
)
def test_peak_memory_reads_at_its_own_precision(mib, kind, text):
    from webapp.experiments.templatetags.measures import peak_memory

    html = str(peak_memory(mib, kind))
    assert re.fullmatch(r'<span title="[^"]+">(.*)</span>', html).group(1) == text


def test_a_cpu_run_that_grew_no_memory_reads_not_measured(client, cast):
    """Tiny models on a CPU train in memory the worker already holds: its RSS grows by 0,
    which the pages must not show as "0 MiB"."""
    cpu = {"memory_kind": "rss", "wall_s": 2.0}
    flat = _finished_run(cast, "flat", peak_memory_mb=0.0, tokens_per_s=123456.7, **cpu)
    small = _finished_run(cast, "small", peak_memory_mb=0.42, **cpu)
    client.force_login(cast.alice)
    page = client.get(reverse("compare"), {"runs": [flat.id, small.id]}).content.decode()
    table = page[page.index('<table class="table tradeoff">') : page.index("</table>")]
    assert " 0 MiB" not in table and ">0 MiB" not in table
    assert "Not measured on this device" in table and ">0.4 MiB<" in table
    assert ">123,000<" in table  # three significant figures, not 123457
    run_page = client.get(reverse("run_detail", args=[flat.id])).content.decode()
    assert "Not measured on this device" in run_page and ">0 MiB" not in run_page
    rows = client.get(reverse("compare_csv"), {"runs": [small.id]}).content.decode()
    row = next(csv.DictReader(io.StringIO(rows)))
    assert (row["peak_memory_mb"], row["memory_kind"], row["train_s"]) == ("0.42", "rss", "2.0")


def test_compare_never_shows_another_teams_runs(client, cast):
    run = _finished_run(cast, "acme secret")
    client.force_login(cast.mallory)
    response = client.get(reverse("compare"), {"runs": [run.id]})
    assert response.context["runs"] == []
    assert "acme secret" not in response.content.decode()
    csv_text = client.get(reverse("compare_csv"), {"runs": [run.id]}).content.decode()
    assert "acme secret" not in csv_text


def test_script_names_stay_text_everywhere(client, cast):
    run = _finished_run(cast, XSS)
    Tag.objects.create(run=run, name=XSS)
    client.force_login(cast.alice)
    urls = [
        reverse("runs"),
        reverse("run_detail", args=[run.id]),
        reverse("compare") + f"?runs={run.id}",
    ]
    for url in urls:
        page = client.get(url).content.decode()
        assert "<img src=x" not in page, url
        assert "&lt;img src=x onerror=alert(1)&gt;" in page or "\\u003Cimg" in page, url


def test_csv_escapes_formula_cells(client, cast):
    run = _finished_run(cast, '=HYPERLINK("http://x")')
    client.force_login(cast.alice)
    response = client.get(reverse("compare_csv"), {"runs": [run.id]})
    assert response["Content-Disposition"].startswith("attachment;")
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert rows[0]["run"] == '\'=HYPERLINK("http://x")'
    assert rows[0]["trainable_params"] == "1000"
    assert [csv_cell(v) for v in ("+1", "-x", "@a", "ok", -2.5)] == [
        "'+1",
        "'-x",
        "'@a",
        "ok",
        -2.5,
    ]


def test_tags_are_added_removed_and_guarded(client, cast):
    run = _finished_run(cast, "tagged")
    url = reverse("run_tags", args=[run.id])
    client.force_login(cast.bob)
    client.post(url, {"add": XSS})
    assert list(run.tags.values_list("name", flat=True)) == [XSS]
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    client.force_login(cast.carol)  # a viewer
    client.post(url, {"add": "nope"})
    client.force_login(cast.mallory)
    assert client.post(url, {"remove": XSS}).status_code == 404
    client.force_login(cast.alice)
    client.post(url, {"remove": XSS})
    client.post(url, {"add": "x" * 51})
    assert not run.tags.exists()


def test_finished_runs_curves_are_cached_running_ones_are_not(cast, make_run):
    from django.core.cache import cache
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from webapp.experiments.comparison import curves

    cache.clear()
    done = _finished_run(cast, "done")
    running = make_run(name="running")
    fence = leases.run_claim(run_id=running.id, worker="w")
    metrics.metrics_record(
        run_id=running.id, fence=fence, points=[metrics.Point("train_loss", 1, 2.0, 0.0)]
    )
    done.refresh_from_db()
    first = curves([done, running])
    assert list(first) == [done.id, running.id]
    with CaptureQueriesContext(connection) as queries:
        assert curves([done]) == {done.id: first[done.id]}
    assert not queries.captured_queries
    with CaptureQueriesContext(connection) as queries:
        assert curves([running]) == {running.id: first[running.id]}
    assert queries.captured_queries


def test_runs_list_queries_do_not_grow_with_runs(client, cast, django_assert_max_num_queries):
    for i in range(30):
        run = _finished_run(cast, f"run {i}")
        Tag.objects.create(run=run, name="t")
    client.force_login(cast.alice)
    # 9: with the person's metric columns, the page's numbers for them and its summary keys
    with django_assert_max_num_queries(9):
        page = client.get(reverse("runs")).context["page"]
    assert len(page.object_list) == 25 and page.paginator.count == 30
