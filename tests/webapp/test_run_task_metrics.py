"""The run page shows a run's task metrics, base model → adapter, what it was evaluated on, and
draws them in their own chart; the compare page offers them as curves."""

import pytest
from django.urls import reverse

from webapp.experiments.displayed_metrics import COMPARE_KEYS, RUN_PAGE_KEYS

pytestmark = pytest.mark.django_db


def test_the_run_page_shows_base_to_trained_and_the_rows_read(client, cast, make_run):
    run = make_run(
        status="succeeded",
        train_config={"steps": 5, "batch_size": 4, "eval_batches": 3,
                      "eval_metrics": ["exact_match", "chrf"], "max_new_tokens": 16},
        summary={"base_eval_exact_match": 0.0, "eval_exact_match": 0.25,
                 "base_eval_chrf": 0.125, "eval_chrf": 0.5, "eval_loss": 1.0},
    )  # fmt: skip
    client.force_login(cast.carol)
    response = client.get(reverse("run_detail", args=[run.id]))
    page = response.content.decode()
    assert "<th>Eval exact match</th><td>base model 0.000 → adapter 0.250</td>" in page
    assert "<th>Eval chrF</th><td>base model 0.125 → adapter 0.500</td>" in page
    assert (
        "Evaluated on the first 12 of 240 validation rows (eval batches × batch size): the "
        "loss and exact match, chrF, on greedy answers of at most 16 new tokens" in page
    )
    assert 'id="task-chart"' in page
    assert {"eval_exact_match", "base_eval_exact_match"} <= set(RUN_PAGE_KEYS)  # fetched
    drawn = {m["key"]: m["chart"] for m in response.context["displayed_metrics"]}
    assert drawn["eval_exact_match"] == drawn["base_eval_chrf"] == "task"


def test_a_run_without_task_metrics_says_it_reads_the_loss_alone(client, cast, make_run):
    run = make_run(train_config={"steps": 5, "batch_size": 8})
    client.force_login(cast.carol)
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert "Evaluated on the first 64 of 240 validation rows" in page
    assert "the loss alone" in page and "task-metric" not in page


def test_compare_offers_the_task_metrics_as_curves(client, cast, make_run):
    runs = ",".join(str(make_run(name=f"r{i}").id) for i in range(2))
    client.force_login(cast.carol)
    response = client.get(reverse("compare") + f"?runs={runs}")
    offered = {m["key"]: m["label"] for m in response.context["displayed_metrics"]}
    assert offered["eval_rouge_l"] == "eval ROUGE-L" and offered["eval_chrf"] == "eval chrF"
    assert "base_eval_rouge_l" not in offered  # a point at step 0, drawn on the run page
    assert {"eval_exact_match", "eval_macro_f1"} <= set(COMPARE_KEYS)


def test_a_clone_scores_what_its_run_scored(client, cast, make_run):
    client.force_login(cast.bob)
    scored = make_run(train_config={"steps": 5, "eval_metrics": ["token_f1"]})
    form = client.get(reverse("run_new") + f"?clone={scored.id}").context["form"]
    assert form.initial["eval_metrics"] == ["token_f1"]
    plain = make_run(train_config={"steps": 5})  # the loss alone, then
    assert (
        client.get(reverse("run_new") + f"?clone={plain.id}")
        .context["form"]
        .initial["eval_metrics"]
        == []
    )
