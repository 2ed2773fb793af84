"""Sweeps through the API: the sweep form's grid from a dict, one queued run per combination."""

import pytest
from django.urls import reverse

from webapp.experiments.models import Run, Sweep

pytestmark = pytest.mark.django_db


def _body(cast, **fields) -> dict:
    body = {
        "name": "rank study",
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "methods": ["lora", "ia3"],
        "grid": {"lora.r": [4, 8], "lora.use_rslora": [True]},
        "train_config": {"steps": 5},
    }
    return {**body, **fields}


def test_sweep_launches_one_run_per_combination(cast, api):
    response = api(cast.bob).post(reverse("api-sweeps"), _body(cast), format="json")
    assert response.status_code == 201
    sweep = Sweep.objects.get()
    data = response.json()
    assert (data["id"], data["name"], data["url"]) == (
        sweep.id,
        "rank study",
        f"http://testserver/sweeps/{sweep.id}/",
    )
    assert data["grid"]["grid"] == {"lora.r": ["4", "8"], "lora.use_rslora": ["True"]}
    runs = Run.objects.filter(sweep=sweep).order_by("id")
    assert [run["id"] for run in data["runs"]] == [run.id for run in runs]
    configs = sorted(
        (run.method, run.method_config.get("r"), run.method_config.get("use_rslora"))
        for run in runs
    )
    assert configs == [("ia3", None, None), ("lora", 4, True), ("lora", 8, True)]
    assert {run.status for run in runs} == {"queued"} and {run.total_steps for run in runs} == {5}


def test_sweep_without_a_name_or_grid(cast, api):
    body = _body(cast, methods=["lora"], grid={})
    del body["name"]
    response = api(cast.alice).post(reverse("api-sweeps"), body, format="json")
    assert response.status_code == 201
    assert response.json()["name"] == "lora sweep on tiny-llama"
    assert len(response.json()["runs"]) == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"grid": {"lora.rank": [4]}}, "grid"),
        ({"grid": {"dora.r": [4]}}, "grid"),  # dora is not among the methods
        ({"grid": {"lora.r": [0, 4]}}, "grid"),
        ({"grid": {"lora.r": ["4, 5"]}}, "grid"),  # would smuggle a value into the form's text
        ({"grid": {"lora.r = 4\nlora.alpha": [1]}}, "grid"),
        ({"grid": {"lora.r": list(range(1, 12))}}, "grid"),
        ({"methods": []}, "methods"),
        ({"methods": ["lora", "nope"]}, "methods"),
        ({"train_config": {"steps": 0}}, "steps"),
    ],
)
def test_sweep_rejects_what_the_form_rejects(cast, api, change, field):
    response = api(cast.bob).post(reverse("api-sweeps"), _body(cast, **change), format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert not Sweep.objects.exists() and not Run.objects.exists()


def test_a_viewer_cannot_sweep(cast, api):
    response = api(cast.carol).post(reverse("api-sweeps"), _body(cast), format="json")
    assert response.status_code == 403
    assert not Sweep.objects.exists()


def test_sweeps_are_listed_and_read_by_their_team_only(cast, api):
    created = api(cast.bob).post(reverse("api-sweeps"), _body(cast), format="json").json()
    listing = api(cast.carol).get(reverse("api-sweeps")).json()
    assert listing["count"] == 1 and "runs" not in listing["results"][0]
    detail = api(cast.carol).get(reverse("api-sweep", args=[created["id"]])).json()
    assert len(detail["runs"]) == 3 and detail["project"]["team"]["name"] == "Acme"
    assert api(cast.mallory).get(reverse("api-sweeps")).json()["count"] == 0
    assert api(cast.mallory).get(reverse("api-sweep", args=[created["id"]])).status_code == 404


def test_a_training_setting_is_a_grid_axis_for_every_method(cast, api):
    grid = {"lora.r": [4, 8], "train.schedule": ["linear", "cosine"], "train.grad_accum": [2]}
    response = api(cast.bob).post(reverse("api-sweeps"), _body(cast, grid=grid), format="json")
    assert response.status_code == 201, response.json()
    runs = Run.objects.filter(sweep_id=response.json()["id"])
    seen = {(r.method, r.method_config.get("r"), r.train_config["schedule"]) for r in runs}
    assert seen == {
        ("lora", 4, "linear"), ("lora", 4, "cosine"), ("lora", 8, "linear"),
        ("lora", 8, "cosine"), ("ia3", None, "linear"), ("ia3", None, "cosine"),
    }  # fmt: skip
    assert {r.train_config["grad_accum"] for r in runs} == {2}
    assert all("train.schedule=" in r.name for r in runs)

    for bad, message in (
        ({"train.grad_accum": [0]}, "grad_accum"),
        ({"train.schedule": ["exponential"]}, "schedule must be one of"),
        ({"train.gradient_checkpointing": ["maybe"]}, "is not a bool"),
        ({"train.method": ["x"]}, "train has no field method"),
    ):
        refused = api(cast.bob).post(reverse("api-sweeps"), _body(cast, grid=bad), format="json")
        assert refused.status_code == 400, refused.json()
        assert message in " ".join(refused.json()["grid"]), (bad, refused.json())
    assert Run.objects.count() == 6


def test_a_quantised_base_is_refused_for_a_method_that_cannot_sit_on_it(cast, api):
    body = _body(cast, methods=["lora", "mam"], grid={"train.quantize": ["none", "nf4"]})
    refused = api(cast.bob).post(reverse("api-sweeps"), body, format="json")
    assert refused.status_code == 400
    assert "mam cannot train on a nf4 base" in " ".join(refused.json()["grid"])
    body = _body(cast, methods=["lora", "dora", "ia3"], grid={"train.quantize": ["none", "nf4"]})
    assert api(cast.bob).post(reverse("api-sweeps"), body, format="json").status_code == 201


def test_packing_is_a_grid_axis_refused_for_methods_and_tasks_that_cannot_pack(cast, api):
    body = _body(cast, methods=["lora", "ia3"], grid={"train.packing": ["true", "false"]})
    response = api(cast.bob).post(reverse("api-sweeps"), body, format="json")
    assert response.status_code == 201, response.json()
    runs = Run.objects.filter(sweep_id=response.json()["id"])
    seen = {(r.method, r.train_config["packing"]) for r in runs}
    assert seen == {("lora", True), ("lora", False), ("ia3", True), ("ia3", False)}

    for change, message in (
        ({"methods": ["lora", "prefix"]}, "prefix cannot train packed"),
        ({"dataset": cast.datasets["sample-sentiment"].id}, "packing is for causal LM training"),
    ):
        body = _body(cast, grid={"train.packing": ["false", "true"]}, **change)
        refused = api(cast.bob).post(reverse("api-sweeps"), body, format="json")
        assert refused.status_code == 400 and message in " ".join(refused.json()["grid"]), change
    assert Run.objects.count() == 4
