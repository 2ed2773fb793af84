"""GET /api/v1/runs/ with the query language of `q` and a sort by metric or config
(webapp/experiments/run_search.py): what the runs page lists, the same 400s, one team only."""

import pytest
from django.urls import reverse

from webapp.experiments.models import RunStatus

pytestmark = pytest.mark.django_db


@pytest.fixture
def scored(cast, make_run):
    """Three Acme runs with eval figures; Umbrella's beats them all."""
    return {
        "a": make_run(name="a", summary={"eval_loss": 0.9, "eval_exact_match": 0.4}),
        "b": make_run(
            name="b",
            method="ia3",
            method_config={},
            status=RunStatus.SUCCEEDED,
            summary={"eval_loss": 1.4, "eval_exact_match": 0.6},
        ),
        "c": make_run(name="c", method_config={"r": 16}),
        "theirs": make_run(
            name="theirs",
            project=cast.umbrella_project,
            summary={"eval_loss": 0.1, "eval_exact_match": 0.9},
        ),
    }


def _names(client, **params) -> list[str]:
    response = client.get(reverse("api-runs"), params)
    assert response.status_code == 200, response.content
    return [run["name"] for run in response.json()["results"]]


def test_filter_and_sort_by_metric_and_config(cast, api, scored):
    client = api(cast.bob)
    assert _names(client, q="eval_loss<1.2") == ["a"]
    assert _names(client, q="eval_loss>=0.5 status=succeeded") == ["b"]
    assert _names(client, sort="-eval_exact_match") == ["b", "a", "c"]  # c has none: last
    assert _names(client, sort="eval_exact_match") == ["a", "b", "c"]
    assert _names(client, q="config.lora.r=8") == ["a"]
    assert _names(client, q="config.r>8") == ["c"]
    assert _names(client, q="method=lora", sort="-config.r") == ["c", "a"]
    assert _names(client, q="eval_loss<1.2", method="lora") == ["a"]  # with the old filters


def test_never_another_teams_runs(cast, api, scored):
    client = api(cast.bob)
    assert "theirs" not in _names(client, q="eval_loss<0.5 eval_exact_match>0.8")
    assert _names(client, sort="eval_loss")[0] == "a"
    assert _names(api(cast.mallory), q="eval_loss<1.2") == ["theirs"]


@pytest.mark.parametrize(
    ("params", "field", "says"),
    [
        ({"q": "eval_loss<abc"}, "q", "eval_loss: abc is not a number."),
        ({"q": "status=exploded"}, "q", "status is one of"),
        ({"q": "x" * 501}, "q", "no more than 500 characters"),
        ({"q": 'name="open'}, "q", "A quote is not closed"),
        ({"sort": "-"}, "sort", "Sort by newest, oldest, a field"),
        ({"sort": "bogus key!"}, "sort", "Sort by newest"),
    ],
)
def test_a_bad_query_or_sort_is_a_400_naming_it(cast, api, scored, params, field, says):
    response = api(cast.bob).get(reverse("api-runs"), params)
    assert response.status_code == 400
    assert says in response.json()[field][0]
