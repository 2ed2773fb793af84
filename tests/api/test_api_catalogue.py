"""Who am I, what can be trained on what, and the datasets: read, upload, delete."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from peft_core.catalogue import CATALOGUE
from peft_core.configs import MAX_RANK
from webapp.experiments import services
from webapp.experiments.method_forms import METHOD_FORMS
from webapp.experiments.models import Dataset

pytestmark = pytest.mark.django_db


def _upload(cast, name: str = "reviews", **fields) -> Dataset:
    return services.dataset_upload_create(
        user=cast.alice,
        team=fields.get("team", cast.acme),
        name=name,
        filename="d.csv",
        data=b"text,label\ngreat film,positive\nawful plot,negative\n",
        task="seq-cls",
    )


def test_me_lists_teams_with_roles_and_projects_with_launch_rights(cast, api):
    alice = api(cast.alice).get(reverse("api-me")).json()
    assert alice["username"] == "alice" and alice["id"] == cast.alice.id
    assert alice["teams"] == [{"id": cast.acme.id, "name": "Acme", "role": "owner"}]
    project = {"id": cast.acme_project.id, "name": "Default"}
    team = {"id": cast.acme.id, "name": "Acme"}
    assert alice["projects"] == [{**project, "team": team, "can_launch": True}]
    carol = api(cast.carol).get(reverse("api-me")).json()
    assert carol["teams"][0]["role"] == "viewer"
    assert carol["projects"][0]["can_launch"] is False


def test_projects_are_the_users_own(cast, api):
    mallory = api(cast.mallory).get(reverse("api-projects")).json()
    assert [p["id"] for p in mallory] == [cast.umbrella_project.id]
    assert mallory[0]["team"]["name"] == "Umbrella" and mallory[0]["can_launch"] is True
    carol = api(cast.carol).get(reverse("api-projects")).json()
    assert [(p["id"], p["can_launch"]) for p in carol] == [(cast.acme_project.id, False)]


def test_the_bundled_models_are_listed_first_for_every_team(cast, api):
    models = api(cast.bob).get(reverse("api-models")).json()
    assert [m["key"] for m in models] == sorted(CATALOGUE)
    minilm = next(m for m in models if m["key"] == "all-minilm-l6-v2")
    assert minilm["tasks"] == list(CATALOGUE["all-minilm-l6-v2"].tasks)
    assert (minilm["team"], minilm["source"], minilm["status"]) == (None, "catalogue", "ready")
    assert minilm["revision"] == CATALOGUE["all-minilm-l6-v2"].hub_id
    assert api(cast.mallory).get(reverse("api-models")).json() == models


def test_methods_describe_their_form_fields(cast, api):
    methods = {m["key"]: m for m in api(cast.bob).get(reverse("api-methods")).json()}
    assert list(methods) == list(METHOD_FORMS)
    lora = methods["lora"]
    assert lora["title"] == "LoRA" and "low-rank" in lora["summary"]
    r = lora["fields"]["r"]
    assert (r["type"], r["default"], r["min"], r["max"]) == ("integer", 8, 1, MAX_RANK)
    assert "low-rank update" in r["help"]
    assert lora["fields"]["alpha"]["type"] == "number"
    rslora = lora["fields"]["use_rslora"]
    assert (rslora["type"], rslora["default"]) == ("boolean", False)
    targets = lora["fields"]["target_modules"]
    assert (targets["type"], targets["default"]) == ("string", "default")
    assert "all-linear" in targets["help"] and "regex" in targets["help"]
    assert methods["prompt"]["fields"]["init_text"]["type"] == "string"
    assert methods["ia3"]["fields"]["targets"]["default"] == "default"


def test_dataset_list_is_paginated_and_hides_other_teams(cast, api):
    upload = _upload(cast, name="acme-only")
    mallory = api(cast.mallory).get(reverse("api-datasets")).json()
    assert set(mallory) == {"count", "next", "previous", "results"}
    assert upload.id not in [d["id"] for d in mallory["results"]]
    assert mallory["count"] == len(cast.datasets)
    bob = api(cast.bob).get(reverse("api-datasets"), {"limit": 1}).json()
    assert bob["count"] == len(cast.datasets) + 1 and len(bob["results"]) == 1
    assert "offset=1" in bob["next"]


def test_dataset_detail_has_the_fields_and_a_preview(cast, api):
    upload = _upload(cast)
    data = api(cast.carol).get(reverse("api-dataset", args=[upload.id])).json()
    assert data["team"] == cast.acme.id and data["row_count"] == 2
    assert data["label_names"] == ["negative", "positive"]
    assert data["preview"] == [
        {"text": "great film", "label": "positive"},
        {"text": "awful plot", "label": "negative"},
    ]
    builtin = cast.datasets["sample-sentiment"]
    sample = api(cast.mallory).get(reverse("api-dataset", args=[builtin.id])).json()
    assert sample["team"] is None and sample["builtin_key"] == "sample-sentiment"
    assert 0 < len(sample["preview"]) <= 20
    assert api(cast.mallory).get(reverse("api-dataset", args=[upload.id])).status_code == 404


def _post_file(client, cast, filename: str, content: bytes, **fields):
    body = {"name": "my data", "team": cast.acme.id, "task": "causal-lm"}
    body |= fields | {"file": SimpleUploadedFile(filename, content)}
    return client.post(reverse("api-datasets"), body, format="multipart")


def test_csv_upload_creates_a_dataset(cast, api):
    csv = b"prompt,completion\nhi,hello\nbye,goodbye\n"
    response = _post_file(api(cast.bob), cast, "greetings.csv", csv)
    assert response.status_code == 201
    dataset = Dataset.objects.get(id=response.json()["id"])
    assert (dataset.team, dataset.row_count, dataset.created_by) == (cast.acme, 2, cast.bob)
    assert response.json()["columns"] == ["completion", "prompt"]


def test_malformed_upload_is_400_naming_the_line_and_stores_nothing(cast, api):
    lines = [b'{"prompt": "a", "completion": "b"}', b'{"prompt": "broken", ', b'{"prompt": "c"}']
    response = _post_file(api(cast.bob), cast, "bad.jsonl", b"\n".join(lines))
    assert response.status_code == 400
    assert "line 2" in response.json()["detail"]
    assert not Dataset.objects.filter(team=cast.acme).exists()


def test_upload_refusals(cast, api):
    csv = b"prompt,completion\nhi,hello\n"
    viewer = _post_file(api(cast.carol), cast, "ok.csv", csv)
    assert viewer.status_code == 403 and "Viewers" in viewer.json()["detail"]
    other_team = _post_file(api(cast.mallory), cast, "ok.csv", csv)
    assert other_team.status_code == 400 and "team" in other_team.json()
    bad_task = _post_file(api(cast.bob), cast, "ok.csv", csv, task="poetry")
    assert bad_task.status_code == 400 and "task" in bad_task.json()
    assert not Dataset.objects.filter(team__isnull=False).exists()


def test_dataset_delete_is_for_admins_and_refuses_used_or_builtin(cast, api, make_run):
    upload, used = _upload(cast), _upload(cast, name="used")
    make_run(dataset=used, status="succeeded")
    url = reverse("api-dataset", args=[upload.id])
    assert api(cast.bob).delete(url).status_code == 403
    assert api(cast.mallory).delete(url).status_code == 404
    assert api(cast.alice).delete(url).status_code == 204
    assert not Dataset.objects.filter(id=upload.id).exists()
    in_use = api(cast.alice).delete(reverse("api-dataset", args=[used.id]))
    assert in_use.status_code == 409 and "Runs use this dataset" in in_use.json()["detail"]
    builtin = cast.datasets["sample-sentiment"]
    assert api(cast.alice).delete(reverse("api-dataset", args=[builtin.id])).status_code == 409
    assert Dataset.objects.filter(id__in=[used.id, builtin.id]).count() == 2
