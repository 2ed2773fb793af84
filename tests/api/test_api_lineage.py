"""The API's run carries the lineage its worker recorded at claim."""

import pytest
from django.urls import reverse

pytestmark = pytest.mark.django_db

LINEAGE = {"python": "3.11.2", "torch": "2.10.0+cpu", "gpu": "cpu", "gpu_count": 0, "seed": 5}


def test_the_api_run_has_its_lineage(cast, api, make_run):
    run = make_run(lineage=LINEAGE)
    response = api(cast.carol).get(reverse("api-run", args=[run.id]))
    assert response.status_code == 200
    assert response.json()["lineage"] == LINEAGE


def test_a_run_not_yet_taken_has_an_empty_lineage(cast, api, make_run):
    run = make_run()
    response = api(cast.bob).get(reverse("api-run", args=[run.id]))
    assert response.status_code == 200 and response.json()["lineage"] == {}
