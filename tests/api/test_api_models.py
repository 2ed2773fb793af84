"""/api/v1/models/: register (admins), list and read the registry; a refusal is a 400 with the
reason and nothing stored or queued; another team's model is 404."""

import pytest
from django.urls import reverse

from tests.peft_core.test_sources import fill_hub_cache
from webapp.registry.models import BaseModel, ModelSource

pytestmark = pytest.mark.django_db


def test_the_api_registers_lists_and_refuses(cast, api, allowed_root, published, settings):
    response = api(cast.alice).post(
        reverse("api-models"), {"team": cast.acme.id, "name": "my-qwen", "path": "my-qwen"},
        format="json",
    )  # fmt: skip
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["status"] == "inspecting" and body["source"] == "local" and body["facts"] == {}
    listed = {m["key"]: m for m in api(cast.bob).get(reverse("api-models")).json()}
    assert {"smollm2-135m-instruct", "tiny-llama", "my-qwen"} <= set(listed)
    assert listed["tiny-llama"]["team"] is None and listed["my-qwen"]["team"] == "Acme"
    assert "my-qwen" not in {m["key"] for m in api(cast.mallory).get(reverse("api-models")).json()}
    assert api(cast.mallory).get(reverse("api-model", args=[body["id"]])).status_code == 404

    refused = api(cast.alice).post(
        reverse("api-models"), {"team": cast.acme.id, "name": "etc", "path": "/etc"},
        format="json",
    )  # fmt: skip
    assert refused.status_code == 400 and "outside the allowed" in refused.json()["detail"]
    member = api(cast.bob).post(
        reverse("api-models"), {"team": cast.acme.id, "name": "x", "path": "my-qwen"},
        format="json",
    )  # fmt: skip
    assert member.status_code == 403 and "admin" in member.json()["detail"]
    assert BaseModel.objects.filter(team=cast.acme).count() == 1


def test_a_hub_id_in_the_cache_registers_offline_with_its_commit(
    cast, api, settings, tmp_path, model_root, published, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings.HF_HUB_CACHE = tmp_path / "hub"
    commit = fill_hub_cache(tmp_path / "hub", "acme/tiny-qwen", model_root / "my-qwen")
    response = api(cast.alice).post(
        reverse("api-models"),
        {"team": cast.acme.id, "name": "hub-qwen", "hub": "acme/tiny-qwen@main"},
        format="json",
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert (body["location"], body["revision"], body["commit"]) == (
        "acme/tiny-qwen",
        "main",
        commit,
    )

    missing = api(cast.alice).post(
        reverse("api-models"),
        {"team": cast.acme.id, "name": "absent", "hub": "acme/absent@main"},
        format="json",
    )
    assert missing.status_code == 400
    assert "not in the HF cache" in missing.json()["detail"]
    assert not BaseModel.objects.filter(name="absent").exists()


def test_a_model_that_is_not_ready_cannot_be_launched_on(cast, api, allowed_root):
    BaseModel.objects.create(
        team=cast.acme, name="half", source=ModelSource.LOCAL, location="/x", tasks=["causal-lm"]
    )
    response = api(cast.bob).post(
        reverse("api-runs"),
        {"base_model": "half", "dataset": cast.datasets["sample-instructions"].id,
         "method": "lora"},
        format="json",
    )  # fmt: skip
    assert response.status_code == 400
    assert "base_model" in response.json()
