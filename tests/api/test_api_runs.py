"""Runs through the API: launched with the browser's bounds, listed with the page's filters,
cancelled and deleted by role; another team's run is 404 on every route."""

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from webapp.experiments import services
from webapp.experiments.models import MetricPoint, Run, RunStatus, Tag

pytestmark = pytest.mark.django_db

INVALID_CHOICE = "Select a valid choice. That choice is not one of the available choices."


def _body(cast, **fields) -> dict:
    body = {
        "name": "api run",
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "method": "lora",
        "method_config": {"r": 4, "target_modules": "all-linear"},
        "train_config": {"steps": 12, "learning_rate": 2e-4},
    }
    return {**body, **fields}


def test_launch_queues_a_run_and_enqueues_it_on_commit(
    cast, api, django_capture_on_commit_callbacks, published
):
    with django_capture_on_commit_callbacks(execute=True):
        response = api(cast.bob).post(reverse("api-runs"), _body(cast), format="json")
    assert response.status_code == 201
    run = Run.objects.get()
    data = response.json()
    assert (data["id"], data["status"], data["external"]) == (run.id, "queued", False)
    assert data["url"] == f"http://testserver/runs/{run.id}/"
    assert data["project"] == {
        "id": cast.acme_project.id,
        "name": "Default",
        "team": {"id": cast.acme.id, "name": "Acme"},
    }
    assert data["created_by"] == "bob" and data["latest"] == {"train_loss": None, "eval_loss": None}
    assert run.method_config == {
        "r": 4,
        "alpha": 16.0,
        "dropout": 0.05,
        "target_modules": "all-linear",
        "use_rslora": False,
    }
    # Missing train keys take the launch form's initial values; the task metrics are the
    # dataset's own (sample-instructions: none, the loss alone).
    assert run.train_config == {
        "steps": 12,
        "batch_size": 4,
        "learning_rate": 2e-4,
        "max_length": 128,
        "eval_every": 10,
        "seed": 0,
    }
    assert run.total_steps == 12
    assert published == [("peftlab.train_run", (run.id,))]


def test_launch_defaults_name_project_and_settings(cast, api):
    body = {
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "method": "ia3",
    }
    response = api(cast.alice).post(reverse("api-runs"), body, format="json")
    assert response.status_code == 201
    run = Run.objects.get()
    assert (run.name, run.project, run.method_config) == (
        "ia3 on tiny-llama",
        cast.acme_project,
        {},
    )
    assert run.train_config["steps"] == 30


def test_external_launch_is_running_and_not_enqueued(cast, api, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        response = api(cast.bob).post(
            reverse("api-runs"), _body(cast, external=True), format="json"
        )
    assert response.status_code == 201
    assert (response.json()["status"], response.json()["external"]) == ("running", True)
    assert callbacks == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"method_config": {"r": 0}}, "method_config"),
        ({"method_config": {"r": 100000}}, "method_config"),
        ({"method_config": {"dropout": 1.5}}, "method_config"),
        ({"method_config": {"rank": 4}}, "method_config"),
        ({"method_config": {"r": [4]}}, "method_config"),
        ({"train_config": {"steps": 0}}, "steps"),
        ({"train_config": {"learning_rate": 5}}, "learning_rate"),
        ({"train_config": {"epochs": 3}}, "train_config"),
        ({"method": "full-finetune"}, "method"),
        ({"base_model": "gpt-5"}, "base_model"),
        ({"base_model": "all-minilm-l6-v2"}, "dataset"),  # a causal-LM dataset on a classifier
        ({"dataset": 10**30}, "dataset"),
    ],
)
def test_launch_rejects_what_the_form_rejects(cast, api, change, field):
    response = api(cast.bob).post(reverse("api-runs"), _body(cast, **change), format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert not Run.objects.exists()


def test_method_errors_are_nested_by_field(cast, api):
    response = api(cast.bob).post(
        reverse("api-runs"), _body(cast, method_config={"r": 0}), format="json"
    )
    assert response.json() == {
        "method_config": {"r": ["Ensure this value is greater than or equal to 1."]}
    }


@pytest.mark.parametrize(
    ("method_config", "field", "message"),
    [
        ({"alpha": 0}, "alpha", "LoRA alpha must be a number in (0, 10000], got 0.0"),
        ({"dropout": 1}, "dropout", "LoRA dropout must be a number in [0, 1), got 1.0"),
        ({"r": 2000}, "r", "Ensure this value is less than or equal to 1024."),
    ],
)
def test_a_value_the_config_refuses_is_a_400_naming_the_field_before_any_run(
    cast, api, published, method_config, field, message
):
    """alpha 0 and dropout 1 pass the form's field bounds (the config's open ends, drawn
    closed) and only peft_core's LoraConfig refuses them; the answer names the field with the
    config's message, and nothing is created or queued. r's bound is the config's 1024."""
    body = _body(cast, method_config=method_config)
    response = api(cast.bob).post(reverse("api-runs"), body, format="json")
    assert response.status_code == 400
    assert response.json() == {"method_config": {field: [message]}}
    assert not Run.objects.exists() and published == []


def test_a_rank_up_to_the_configs_bound_launches(cast, api):
    """r = 512 was refused by the form's own bound (256) though LoraConfig takes up to 1024."""
    body = _body(cast, method_config={"r": 512})
    response = api(cast.bob).post(reverse("api-runs"), body, format="json")
    assert response.status_code == 201
    assert Run.objects.get().method_config["r"] == 512


def test_each_sweep_item_is_judged_by_its_config(cast, api):
    from webapp.experiments.models import Sweep

    body = {
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "methods": ["bottleneck"],
        "grid": {"bottleneck.placement": ["parallel", "houlsby"], "bottleneck.scaling": [4]},
    }
    response = api(cast.bob).post(reverse("api-sweeps"), body, format="json")
    assert response.status_code == 400
    [problem] = response.json()["grid"]
    assert "scaling applies to parallel adapters only, not 'houlsby'" in problem
    assert not Run.objects.exists() and not Sweep.objects.exists()


def test_another_teams_project_or_dataset_is_refused_like_an_unknown_id(cast, api):
    secret = services.dataset_upload_create(
        user=cast.mallory,
        team=cast.umbrella,
        name="umbrella-secret",
        filename="d.csv",
        data=b"prompt,completion\na,b\n",
        task="causal-lm",
    )
    client = api(cast.bob)
    theirs = client.post(reverse("api-runs"), _body(cast, dataset=secret.id), format="json")
    unknown = client.post(reverse("api-runs"), _body(cast, dataset=secret.id + 1000), format="json")
    assert theirs.status_code == unknown.status_code == 400
    assert theirs.json() == unknown.json() == {"dataset": [INVALID_CHOICE]}
    assert "umbrella" not in theirs.content.decode().lower()
    project = client.post(
        reverse("api-runs"), _body(cast, project=cast.umbrella_project.id), format="json"
    )
    assert project.status_code == 400 and project.json() == {"project": [INVALID_CHOICE]}
    assert not Run.objects.exists()


def test_a_viewer_cannot_launch(cast, api):
    for body in (_body(cast), _body(cast, project=cast.acme_project.id)):
        response = api(cast.carol).post(reverse("api-runs"), body, format="json")
        assert response.status_code == 403
        assert "Viewers cannot launch" in response.json()["detail"]
    assert not Run.objects.exists()


def test_list_filters_like_the_runs_page(cast, api, make_run):
    lora = make_run(name="alpha lora", status=RunStatus.SUCCEEDED)
    ia3 = make_run(name="beta ia3", method="ia3", dataset=cast.datasets["sample-sentiment"])
    Tag.objects.create(run=ia3, name="best")
    make_run(name="gamma", project=cast.umbrella_project)
    client = api(cast.bob)

    def ids(**params) -> list[int]:
        response = client.get(reverse("api-runs"), params)
        assert response.status_code == 200, response.content
        return [run["id"] for run in response.json()["results"]]

    assert ids() == [ia3.id, lora.id]
    assert ids(method="lora") == [lora.id]
    assert ids(status="succeeded") == [lora.id]
    assert ids(tag="best") == [ia3.id]
    assert ids(q="BETA") == [ia3.id]
    assert ids(dataset=cast.datasets["sample-sentiment"].id) == [ia3.id]
    assert ids(sort="name") == [lora.id, ia3.id]
    assert ids(method="") == [ia3.id, lora.id]  # a blank filter, as the page's form sends
    assert client.get(reverse("api-runs"), {"sort": "bogus key!"}).status_code == 400
    assert client.get(reverse("api-runs"), {"q": "x" * 501}).status_code == 400
    page = client.get(reverse("api-runs"), {"limit": 1}).json()
    assert page["count"] == 2 and len(page["results"]) == 1 and page["next"]
    assert [
        run["tags"] for run in client.get(reverse("api-runs"), {"tag": "best"}).json()["results"]
    ] == [["best"]]


def test_latest_losses_are_those_of_the_highest_step(cast, api, make_run):
    run = make_run(status=RunStatus.RUNNING)
    for step, value in [(5, 1.5), (9, 0.9), (7, 1.1)]:
        MetricPoint.objects.create(run=run, key="train_loss", step=step, value=value, wall_time=0)
    MetricPoint.objects.create(run=run, key="eval_loss", step=3, value=2.0, wall_time=0)
    client = api(cast.bob)
    detail = client.get(reverse("api-run", args=[run.id])).json()
    assert detail["latest"] == {"train_loss": 0.9, "eval_loss": 2.0}
    listed = client.get(reverse("api-runs")).json()["results"][0]
    assert listed["latest"] == {"train_loss": 0.9, "eval_loss": 2.0}


def test_list_queries_do_not_grow_with_the_page(cast, api, make_run):
    client = api(cast.bob)

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert client.get(reverse("api-runs")).status_code == 200
        return len(captured)

    for i in range(2):
        Tag.objects.create(run=make_run(name=f"run {i}"), name="t")
    queries()  # the first call also notes the token's use
    few = queries()
    for i in range(6):
        Tag.objects.create(run=make_run(name=f"more {i}"), name="t")
    assert queries() == few


def test_another_teams_run_is_404_everywhere_and_unchanged(cast, api, make_run):
    run = make_run(status=RunStatus.RUNNING, external=True)
    client = api(cast.mallory)
    artifact_free = [("get", "api-run"), ("get", "api-run-metrics"), ("get", "api-run-artifacts")]
    writes = [("post", "api-run-cancel", {}), ("delete", "api-run", {})]
    writes += [("post", "api-run-metrics", {"points": [{"key": "x", "step": 1, "value": 1.0}]})]
    writes += [("post", "api-run-finish", {"status": "succeeded"})]
    for verb, name in artifact_free:
        assert getattr(client, verb)(reverse(name, args=[run.id])).status_code == 404, name
    for verb, name, body in writes:
        response = getattr(client, verb)(reverse(name, args=[run.id]), body, format="json")
        assert response.status_code == 404, name
        assert "lora-r8" not in response.content.decode()
    run.refresh_from_db()
    assert (run.status, run.cancel_requested) == (RunStatus.RUNNING, False)
    assert not MetricPoint.objects.exists()
    assert client.get(reverse("api-runs")).json()["count"] == 0


def test_cancel_by_role(cast, api, make_run):
    queued, running = make_run(), make_run(status=RunStatus.RUNNING)
    assert api(cast.carol).post(reverse("api-run-cancel", args=[queued.id])).status_code == 403
    response = api(cast.bob).post(reverse("api-run-cancel", args=[queued.id]))
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    api(cast.bob).post(reverse("api-run-cancel", args=[running.id]))
    running.refresh_from_db()
    assert running.status == RunStatus.RUNNING and running.cancel_requested


def test_delete_by_role_and_state(cast, api, make_run):
    live, done = make_run(status=RunStatus.RUNNING), make_run(status=RunStatus.SUCCEEDED)
    refused = api(cast.alice).delete(reverse("api-run", args=[live.id]))
    assert refused.status_code == 409 and "Cancel the run first" in refused.json()["detail"]
    assert api(cast.bob).delete(reverse("api-run", args=[done.id])).status_code == 403
    assert api(cast.alice).delete(reverse("api-run", args=[done.id])).status_code == 204
    assert list(Run.objects.values_list("id", flat=True)) == [live.id]


def test_run_json_is_plain_json(cast, api, make_run):
    run = make_run(summary={"eval_loss": 1.25}, notes="n")
    data = api(cast.carol).get(reverse("api-run", args=[run.id])).json()
    expected = {"id", "name", "url", "project", "sweep", "base_model", "dataset", "method"}
    expected |= {"method_config", "train_config", "status", "step", "total_steps", "progress"}
    expected |= {"error", "failure_class", "attempt", "summary", "tags", "notes", "external"}
    expected |= {"created_by", "created_at"}
    expected |= {"started_at", "finished_at", "latest", "devices", "gpu_class", "priority"}
    expected |= {"lineage", "profile"}
    assert set(data) == expected
    assert data["dataset"] == {"id": run.dataset_id, "name": "sample-instructions"}
    assert (data["summary"], data["progress"], data["sweep"]) == ({"eval_loss": 1.25}, 0, None)
    json.dumps(data)


def test_the_training_envelope_is_launched_through_the_api_and_judged_by_trainconfig(cast, api):
    envelope = {
        "schedule": "cosine", "warmup_steps": 2, "grad_accum": 4, "precision": "bf16",
        "gradient_checkpointing": True, "attn": "eager", "grad_clip": 0.5,
        "early_stop_patience": 3, "seed": 7,
    }  # fmt: skip
    body = _body(cast, train_config={"steps": 12} | envelope)
    response = api(cast.bob).post(reverse("api-runs"), body, format="json")
    assert response.status_code == 201, response.json()
    assert Run.objects.get().train_config == {
        "steps": 12, "batch_size": 4, "learning_rate": 1e-3, "max_length": 128,
        "eval_every": 10, **envelope,
    }  # fmt: skip

    for bad, field in (
        ({"schedule": "exponential"}, "schedule"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"eval_every": 0, "early_stop_patience": 2}, "early_stop_patience"),
        ({"warmup_steps": 50, "steps": 10}, "warmup_steps"),
    ):
        refused = api(cast.bob).post(
            reverse("api-runs"), _body(cast, train_config=bad), format="json"
        )
        assert refused.status_code == 400 and field in refused.json(), (bad, refused.json())
    assert Run.objects.count() == 1


def test_a_bottleneck_adapter_on_a_4_bit_base_is_a_400_naming_quantize_and_dora_is_queued(
    cast, api
):
    body = _body(cast, method="bottleneck", method_config={}, train_config={"quantize": "nf4"})
    refused = api(cast.bob).post(reverse("api-runs"), body, format="json")
    assert refused.status_code == 400
    assert "bottleneck cannot train on a nf4 base" in refused.json()["quantize"][0]
    assert not Run.objects.exists()
    body = _body(cast, method="dora", train_config={"quantize": "nf4"})
    assert api(cast.bob).post(reverse("api-runs"), body, format="json").status_code == 201
    assert Run.objects.get().method == "dora"


def test_packing_reaches_the_run_and_is_a_400_where_examples_cannot_share_a_row(cast, api):
    body = _body(cast, train_config={"steps": 12, "packing": True})
    response = api(cast.bob).post(reverse("api-runs"), body, format="json")
    assert response.status_code == 201, response.json()
    assert Run.objects.get().train_config["packing"] is True
    for change, message in (
        ({"method": "prompt", "method_config": {}}, "prompt cannot train packed: its virtual"),
        ({"dataset": cast.datasets["sample-sentiment"].id}, "packing is for causal LM training"),
    ):
        body = _body(cast, train_config={"packing": True}, **change)
        refused = api(cast.bob).post(reverse("api-runs"), body, format="json")
        assert refused.status_code == 400 and message in refused.json()["packing"][0], change
        unpacked = _body(cast, train_config={"packing": False}, **change)
        assert api(cast.bob).post(reverse("api-runs"), unpacked, format="json").status_code == 201
    assert Run.objects.count() == 3
    assert [r.train_config.get("packing") for r in Run.objects.order_by("id")] == [True, None, None]
