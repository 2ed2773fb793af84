"""Sweeps over k seeds through the API (issue 18, item 2): k runs per configuration, seeds
distinct, bounds, and the quota counting every run."""

import pytest
from django.urls import reverse

from tests.webapp.test_sweep_seeds import _assert_k_seeds_per_configuration
from webapp.experiments.models import Run

pytestmark = pytest.mark.django_db


def _api_body(cast, **fields) -> dict:
    body = {
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "methods": ["lora", "ia3"],
        "grid": {"lora.r": [4, 8]},
        "train_config": {"steps": 5, "seed": 40},
        "seeds": 3,
    }
    return body | fields


def test_the_api_launches_k_runs_per_configuration(cast, api):
    response = api(cast.bob).post(reverse("api-sweeps"), _api_body(cast), format="json")
    assert response.status_code == 201, response.json()
    runs = list(Run.objects.filter(sweep_id=response.json()["id"]).order_by("id"))
    assert len(response.json()["runs"]) == len(runs) == 9
    _assert_k_seeds_per_configuration(runs, 3, 3)


@pytest.mark.parametrize("seeds", [0, 11])
def test_the_api_bounds_seeds(cast, api, seeds):
    body = _api_body(cast, seeds=seeds)
    response = api(cast.bob).post(reverse("api-sweeps"), body, format="json")
    assert response.status_code == 400 and "seeds" in response.json()
    assert not Run.objects.exists()


def test_the_api_quota_counts_every_seed(cast, api, settings):
    settings.TEAM_MAX_QUEUED = 8
    response = api(cast.bob).post(reverse("api-sweeps"), _api_body(cast), format="json")
    assert response.status_code == 429 and "this launch adds 9" in response.json()["detail"]
    assert not Run.objects.exists()
