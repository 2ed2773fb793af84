"""Who may call the API: a live personal token or a session (with CSRF for writes); the
token endpoint trades a password for a token and leaves audit rows; the schema is private."""

import pytest
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from webapp.accounts.models import ApiToken, AuditEvent
from webapp.accounts.services import api_token_create, api_token_revoke
from webapp.api import urls as api_urls
from webapp.experiments.models import Artifact, Run, Sweep

pytestmark = pytest.mark.django_db


def _endpoints(cast, make_run) -> list[tuple[str, str, list]]:
    """(verb, url name, args) for every verb of every route but the token endpoint."""
    run = make_run()
    artifact = Artifact.objects.create(run=run, name="adapter_config.json", size=0, sha256="0")
    sweep = Sweep.objects.create(
        project=cast.acme_project, name="s", base_model="tiny-llama", dataset=run.dataset
    )
    plain = ["api-me", "api-models", "api-methods", "api-projects", "api-schema", "api-docs"]
    lists = ["api-datasets", "api-runs", "api-sweeps"]
    by_run = [("get", "api-run"), ("delete", "api-run"), ("post", "api-run-cancel")]
    by_run += [("get", "api-run-metrics"), ("post", "api-run-metrics")]
    by_run += [("get", "api-run-metrics-csv"), ("get", "api-run-metrics-parquet")]
    by_run += [
        ("post", "api-run-finish"),
        ("get", "api-run-artifacts"),
        ("post", "api-run-artifacts"),
    ]
    by_run += [("get", "api-run-merged")]
    return [
        *[("get", name, []) for name in plain],
        *[(verb, name, []) for name in lists for verb in ("get", "post")],
        ("get", "api-dataset", [run.dataset_id]),
        ("delete", "api-dataset", [run.dataset_id]),
        ("get", "api-dataset-download", [run.dataset_id]),
        *[(verb, name, [run.id]) for verb, name in by_run],
        ("get", "api-artifact-download", [artifact.id]),
        ("get", "api-sweep", [sweep.id]),
        ("post", "api-adapter-upload", []),
        ("post", "api-models", []),
        ("get", "api-model", [1]),
        ("post", "api-playground", []),
        ("get", "api-playground-prompt", [1]),
        ("get", "api-registry", []),
        ("post", "api-registry", []),
        ("get", "api-registry-ref", ["adapters@production"]),
        ("get", "api-registry-ref-download", ["adapters@production"]),
        ("post", "api-registry-versions", ["adapters"]),
        ("get", "api-registry-version", ["adapters", 1]),
        ("delete", "api-registry-version", ["adapters", 1]),
        ("get", "api-registry-version-download", ["adapters", 1]),
        ("put", "api-registry-alias", ["adapters", "production"]),
        ("delete", "api-registry-alias", ["adapters", "production"]),
    ]


def test_every_endpoint_answers_401_without_credentials(cast, make_run):
    client = APIClient()
    endpoints = _endpoints(cast, make_run)
    every_route = {pattern.name for pattern in api_urls.urlpatterns} - {"api-auth-token"}
    assert {name for _, name, _ in endpoints} == every_route
    for verb, name, args in endpoints:
        response = getattr(client, verb)(reverse(name, args=args))
        assert response.status_code == 401, (verb, name, response.status_code)
        assert response["WWW-Authenticate"] == "Bearer", name
    assert Run.objects.get().status == "queued"
    assert Artifact.objects.exists()


def test_a_revoked_or_unknown_token_is_401(cast):
    token, plain = api_token_create(user=cast.alice, name="t")
    url = reverse("api-me")
    assert Client().get(url, HTTP_AUTHORIZATION=f"Bearer {plain}").status_code == 200
    api_token_revoke(user=cast.alice, token=token)
    assert Client().get(url, HTTP_AUTHORIZATION=f"Bearer {plain}").status_code == 401
    assert Client().get(url, HTTP_AUTHORIZATION="Bearer plt_made-up").status_code == 401
    assert Client().get(url, HTTP_AUTHORIZATION="Bearer a b").status_code == 401


def test_a_token_notes_when_it_was_used(cast):
    token, plain = api_token_create(user=cast.bob, name="t")
    assert token.last_used_at is None
    response = Client().get(reverse("api-me"), HTTP_AUTHORIZATION=f"Bearer {plain}")
    assert response.json()["username"] == "bob"
    token.refresh_from_db()
    assert token.last_used_at is not None


def test_token_endpoint_trades_a_password_for_a_working_token(cast):
    body = {"username": "bob", "password": "bob-pw-9", "name": "laptop"}
    response = APIClient().post(reverse("api-auth-token"), body, format="json")
    assert response.status_code == 201
    data = response.json()
    assert data["name"] == "laptop" and data["token"].startswith("plt_")
    assert ApiToken.objects.get(id=data["id"]).user == cast.bob
    me = Client().get(reverse("api-me"), HTTP_AUTHORIZATION=f"Bearer {data['token']}")
    assert me.json()["username"] == "bob"
    login = AuditEvent.objects.get(action="login")
    assert (login.actor, login.detail) == (cast.bob, {"via": "api"})
    assert AuditEvent.objects.filter(action="api_token.create", actor=cast.bob).exists()


def test_token_endpoint_refuses_a_wrong_password_and_records_it(cast):
    body = {"username": "bob", "password": "guess"}
    response = APIClient().post(reverse("api-auth-token"), body, format="json")
    assert response.status_code == 400
    assert response.json() == {"detail": "Wrong username or password."}
    assert not ApiToken.objects.exists()
    failed = AuditEvent.objects.get(action="login.failed")
    assert failed.actor is None
    assert failed.detail == {"username": "bob", "via": "api"}
    assert failed.target == "bob"  # what the team's audit log matches a failed login on
    assert not AuditEvent.objects.filter(action="login").exists()


def _launch_body(cast) -> dict:
    return {
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "method": "lora",
    }


def test_a_session_reads_but_writes_only_with_the_csrf_token(cast):
    client = Client(enforce_csrf_checks=True)
    client.force_login(cast.bob)
    assert client.get(reverse("api-me")).json()["username"] == "bob"
    url, body = reverse("api-runs"), _launch_body(cast)
    refused = client.post(url, body, content_type="application/json")
    assert refused.status_code == 403
    assert "CSRF" in refused.json()["detail"]
    assert not Run.objects.exists()
    client.get(reverse("run_new"))  # a page sets the csrftoken cookie, as in a browser
    csrf = client.cookies["csrftoken"].value
    accepted = client.post(url, body, content_type="application/json", HTTP_X_CSRFTOKEN=csrf)
    assert accepted.status_code == 201
    assert Run.objects.get().created_by == cast.bob


def test_schema_and_docs_need_credentials(cast):
    assert APIClient().get(reverse("api-schema")).status_code == 401
    assert APIClient().get(reverse("api-docs")).status_code == 401
    client = Client()
    client.force_login(cast.carol)
    docs = client.get(reverse("api-docs"))
    assert docs.status_code == 200
    assert b"drf_spectacular_sidecar/swagger-ui-dist" in docs.content  # our static files


def test_schema_describes_our_paths(cast, api):
    client = api(cast.carol)
    yaml = client.get(reverse("api-schema")).content.decode()
    assert "/api/v1/runs/{run_id}/metrics/:" in yaml
    assert "bearerAuth" in yaml
    schema = client.get(reverse("api-schema") + "?format=json").json()
    assert schema["info"]["title"] == "PEFT Lab API"
    expected = {"/api/v1/runs/", "/api/v1/sweeps/", "/api/v1/auth/token/", "/api/v1/me/"}
    expected |= {"/api/v1/artifacts/{artifact_id}/download/", "/api/v1/datasets/{dataset_id}/"}
    assert expected <= set(schema["paths"])
    assert {"bearerAuth": []} in schema["paths"]["/api/v1/runs/"]["post"]["security"]
    assert "security" not in schema["paths"]["/api/v1/auth/token/"]["post"]  # no credentials
