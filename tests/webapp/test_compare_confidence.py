"""The compare page over seeds (issue 18, items 2 and 5): configurations with mean ± 95 %
interval for every summary metric, "no clear difference", the Pareto front, the
recommendation line, the CSV's spreads, the metric picker and the page's empty states."""

import csv
import io

import pytest
from django.urls import reverse
from django.utils import timezone

from webapp.experiments.colors import run_color
from webapp.experiments.models import Run, RunStatus, Sweep

pytestmark = pytest.mark.django_db

# eval_exact_match per seed: LoRA 0.610 ± 0.099, DoRA 0.590 ± 0.099 (overlap), (IA)³ 0.420 ± 0.050.
EXACT = {"lora": [0.57, 0.61, 0.65], "dora": [0.55, 0.59, 0.63], "ia3": [0.40, 0.42, 0.44]}
PERCENT = {"lora": 0.5, "dora": 0.52, "ia3": 0.05}
PARAMS = {"lora": 5000, "dora": 5200, "ia3": 500}


def seeded_sweep(cast, methods=("lora", "dora", "ia3"), seeds=3) -> tuple[Sweep, list[Run]]:
    """A finished sweep of `methods` over `seeds` seeds, written straight to the database
    (nothing trained): each run with its summary and profile."""
    dataset = cast.datasets["sample-instructions"]
    sweep = Sweep.objects.create(
        project=cast.acme_project, name="seeded", base_model="tiny-llama", dataset=dataset
    )
    runs = []
    for method in methods:
        for seed in range(seeds):
            exact = EXACT[method][seed]
            runs.append(
                Run.objects.create(
                    project=cast.acme_project,
                    sweep=sweep,
                    name=f"seeded · {method} · seed {seed}",
                    created_by=cast.alice,
                    base_model="tiny-llama",
                    dataset=dataset,
                    method=method,
                    method_config={} if method == "ia3" else {"r": 8},
                    train_config={"steps": 5, "learning_rate": 1e-3, "seed": seed},
                    total_steps=5,
                    step=5,
                    status=RunStatus.SUCCEEDED,
                    finished_at=timezone.now(),
                    worker="gpu-host-7:4242",
                    lineage={"host": "gpu-host-7", "seed": seed},
                    summary={
                        "eval_loss": 2.0 - exact,
                        "base_eval_loss": 2.5,
                        "eval_exact_match": exact,
                        "base_eval_exact_match": 0.0,
                    },
                    profile={
                        "trainable_params": PARAMS[method],
                        "trainable_percent": PERCENT[method],
                        "adapter_bytes": 4 * PARAMS[method],
                        "mergeable": True,
                    },
                )
            )
    return sweep, runs


RECOMMENDATION = (
    "Under 0.1 % trainable: (IA)³, eval_exact_match 0.420 ± 0.050 (3 seeds); "
    "under 1 %: LoRA r=8, 0.610 ± 0.099 (3 seeds) — no clear difference from DoRA r=8."
)


def _tradeoff_table(page: str) -> str:
    return page[page.index('<table class="table tradeoff">') : page.index("</table>")]


def test_replicates_read_as_one_configuration_with_its_interval(client, cast):
    sweep, runs = seeded_sweep(cast)
    client.force_login(cast.bob)
    response = client.get(reverse("compare"), {"sweep": sweep.id})
    page = response.content.decode()
    rows = {r["method"]: r for r in response.context["payload"]["tradeoff"]}
    # The settings that tell configurations apart name them (the seed aside): (IA)³ has no r.
    assert {m: r["configuration"] for m, r in rows.items()} == {
        "lora": "LoRA r=8",
        "dora": "DoRA r=8",
        "ia3": "(IA)³",
    }
    assert rows["lora"]["run"] == "seeded · lora"
    assert [r["quality_n"] for r in rows.values()] == [3, 3, 3]
    assert response.context["metric"] == "eval_exact_match"  # a task metric before the loss
    table = _tradeoff_table(page)
    assert table.count("<tr>") == 4  # the header and three configurations, not nine runs
    assert "0.610 ± 0.099 (3 seeds)" in table and "0.590 ± 0.099 (3 seeds)" in table
    assert "1.390 ± 0.099 (3 seeds)" in table  # eval_loss too, in its own column
    assert "no clear difference from seeded · lora" in table
    assert table.count("no clear difference") == 1  # (IA)³ is clearly below
    assert table.count("Pareto front</span>") == 2  # (IA)³ and LoRA; DoRA is beaten by LoRA
    assert RECOMMENDATION in page
    assert "Student" in page  # the interval says how it is made


def test_the_loss_as_quality_flips_the_direction(client, cast):
    sweep, _ = seeded_sweep(cast)
    client.force_login(cast.bob)
    response = client.get(reverse("compare"), {"sweep": sweep.id, "metric": "eval_loss"})
    assert response.context["metric"] == "eval_loss"
    assert response.context["payload"]["metric"] == {"key": "eval_loss", "higher_is_better": False}
    # eval_loss = 2 - exact: the same order, the lowest loss best.
    assert (
        "Under 0.1 % trainable: (IA)³, eval_loss 1.580 ± 0.050 (3 seeds); "
        "under 1 %: LoRA r=8, 1.390 ± 0.099 (3 seeds) — no clear difference from DoRA r=8."
    ) in response.content.decode()
    unknown = client.get(reverse("compare"), {"sweep": sweep.id, "metric": "eval_secret"})
    assert unknown.context["metric"] == "eval_exact_match"


def test_the_csv_carries_the_spreads(client, cast):
    sweep, runs = seeded_sweep(cast)
    client.force_login(cast.bob)
    sheet = client.get(reverse("compare_csv"), {"sweep": sweep.id}).content.decode()
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(sheet))}
    assert len(rows) == 3
    lora = rows["lora"]
    assert float(lora["eval_exact_match_mean"]) == pytest.approx(0.61)
    assert float(lora["eval_exact_match_ci_low"]) == pytest.approx(0.61 - 0.0994, abs=1e-3)
    assert float(lora["eval_exact_match_ci_high"]) == pytest.approx(0.61 + 0.0994, abs=1e-3)
    assert lora["eval_exact_match_n"] == "3" and lora["eval_loss_n"] == "3"
    assert sorted(lora["run_ids"].split()) == sorted(str(r.id) for r in runs[:3])
    assert sorted(lora["seeds"].split()) == ["0", "1", "2"]
    assert (lora["quality_metric"], lora["pareto"]) == ("eval_exact_match", "True")
    assert rows["dora"]["no_clear_difference_from"] == "seeded · lora"
    assert "color" not in lora


def test_one_seed_shows_the_value_and_says_so(client, cast):
    sweep, _ = seeded_sweep(cast, methods=("lora", "dora"), seeds=1)
    client.force_login(cast.bob)
    page = client.get(reverse("compare"), {"sweep": sweep.id}).content.decode()
    table = _tradeoff_table(page)
    assert "0.57 (1 seed)" in table and "0.55 (1 seed)" in table
    assert "no clear difference" not in table  # one seed each: no interval to compare


def test_empty_states(client, cast, make_run):
    client.force_login(cast.bob)
    nothing = client.get(reverse("compare"), {"runs": []}).content.decode()
    assert "Nothing to compare" in nothing and 'id="compare-data"' not in nothing
    queued = make_run(name="waiting")
    page = client.get(reverse("compare"), {"runs": [queued.id]}).content.decode()
    assert 'id="one-run"' in page and "nothing to compare it with yet" in page
    assert 'id="curves-empty"' in page and 'id="curves"' not in page
    assert 'id="scatter-empty"' in page and 'id="parcoords-empty"' in page
    assert "No parallel-coordinates data" in page
    table = _tradeoff_table(page)
    assert "None" not in table and "0 bytes" not in table
    assert '<span class="muted">queued</span>' in table


def test_a_queued_repeat_beside_finished_ones(client, cast):
    sweep, runs = seeded_sweep(cast, methods=("lora",), seeds=2)
    Run.objects.filter(id=runs[1].id).update(status=RunStatus.QUEUED, summary={}, profile={})
    client.force_login(cast.bob)
    response = client.get(reverse("compare"), {"sweep": sweep.id})
    (row,) = response.context["payload"]["tradeoff"]
    assert row["status"] == "1 queued, 1 succeeded"
    assert row["quality_n"] == 1 and row["trainable_params"] == 5000  # the succeeded run's
    assert "0.57 (1 seed)" in response.content.decode()


def test_runs_keep_their_colours_on_the_compare_page(client, cast):
    sweep, runs = seeded_sweep(cast, methods=("lora",), seeds=2)
    client.force_login(cast.bob)
    response = client.get(reverse("compare"), {"sweep": sweep.id})
    colours = {run["id"]: run["color"] for run in response.context["payload"]["runs"]}
    assert colours == {run.id: run_color(run.id) for run in runs}
    assert colours[runs[0].id] != colours[runs[1].id]  # consecutive ids, different colours
    assert f"background: {run_color(runs[1].id)}" in response.content.decode()


def test_another_teams_runs_stay_out(client, cast):
    sweep, runs = seeded_sweep(cast, methods=("lora",), seeds=2)
    client.force_login(cast.mallory)
    response = client.get(reverse("compare"), {"runs": [r.id for r in runs]})
    assert response.context["runs"] == [] and "seeded" not in response.content.decode()


def test_a_configurations_cost_figures_are_its_lowest_seeds_whatever_the_runs_order(cast):
    from webapp.experiments.configurations import tradeoffs

    sweep, runs = seeded_sweep(cast, methods=("lora",), seeds=3)
    for run in runs:
        run.profile = {"overhead": 1.0 + run.train_config["seed"] / 10, "trainable_params": 8}
        run.save(update_fields=["profile"])
    forward = tradeoffs(sorted(runs, key=lambda r: r.id)).rows[0]
    backward = tradeoffs(sorted(runs, key=lambda r: -r.id)).rows[0]
    lowest = min(r.train_config["seed"] for r in runs)
    assert forward["inference_overhead"] == backward["inference_overhead"] == 1.0 + lowest / 10
