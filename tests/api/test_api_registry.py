"""/api/v1/registry/: names, versions, aliases (audited), downloads by alias that are the run's
adapter zip byte for byte, damage refused 409, roles, and another team's names 404."""

import io
import zipfile

import pytest
from django.urls import reverse

from webapp.accounts.models import AuditEvent, Membership, Role
from webapp.experiments.models import Artifact, ArtifactChunk

pytestmark = pytest.mark.django_db

REGISTRY = "/api/v1/registry/"


@pytest.fixture
def registered(api, cast, adapter_run):
    """support-bot of Acme with v1 (run a) and v2 (run b), production → v1."""
    bob = api(cast.bob)
    runs = [adapter_run(name="a"), adapter_run(name="b", weights=b"\x00\x01" * 400)]
    assert bob.post(REGISTRY, {"name": "support-bot"}, format="json").status_code == 201
    for run in runs:
        answer = bob.post(f"{REGISTRY}support-bot/versions/", {"run": run.id}, format="json")
        assert answer.status_code == 201, answer.content
    answer = bob.put(f"{REGISTRY}support-bot/aliases/production/", {"version": 1}, format="json")
    assert answer.status_code == 200
    return runs


def test_a_version_by_alias_names_its_run_files_and_metrics(api, cast, registered):
    version = api(cast.carol).get(f"{REGISTRY}support-bot@production/").json()
    assert version["ref"] == "support-bot@v1" and version["run"] == registered[0].id
    assert version["aliases"] == ["production"] and version["metrics"] == {"eval_loss": 1.25}
    assert [f["name"] for f in version["files"]] == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert version["size"] == sum(f["size"] for f in version["files"]) == 329
    detail = api(cast.carol).get(f"{REGISTRY}support-bot/").json()
    assert [v["number"] for v in detail["versions"]] == [2, 1]
    assert detail["aliases"][0] | {"updated_at": None} == {
        "name": "production",
        "version": 1,
        "updated_by": "bob",
        "updated_at": None,
    }
    listing = api(cast.carol).get(REGISTRY).json()
    assert [(r["name"], r["versions"], r["team"]) for r in listing] == [("support-bot", 2, "Acme")]


def test_download_by_alias_is_the_runs_adapter_zip(api, cast, client, registered):
    viewer = api(cast.carol)
    by_alias = viewer.get(f"{REGISTRY}support-bot@production/download/")
    by_number = viewer.get(f"{REGISTRY}support-bot/versions/1/download/")
    by_ref = viewer.get(f"{REGISTRY}support-bot@v1/download/")
    client.force_login(cast.carol)
    runs_zip = b"".join(
        client.get(reverse("run_adapter_download", args=[registered[0].id])).streaming_content
    )
    bodies = [b"".join(answer.streaming_content) for answer in (by_alias, by_number, by_ref)]
    assert bodies == [runs_zip] * 3
    assert by_alias["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(bodies[0])) as archive:
        assert archive.read("adapter_model.safetensors") == b"w" * 300
    other = b"".join(viewer.get(f"{REGISTRY}support-bot@v2/download/").streaming_content)
    with zipfile.ZipFile(io.BytesIO(other)) as archive:
        assert archive.read("adapter_model.safetensors") == b"\x00\x01" * 400


def test_a_damaged_adapter_is_refused_409(api, cast, registered):
    weights = Artifact.objects.get(run=registered[0], name="adapter_model.safetensors")
    chunk = ArtifactChunk.objects.get(artifact=weights)
    ArtifactChunk.objects.filter(id=chunk.id).update(data=b"x" + bytes(chunk.data)[1:])
    answer = api(cast.carol).get(f"{REGISTRY}support-bot@production/download/")
    assert answer.status_code == 409
    assert "adapter_model.safetensors is damaged" in answer.json()["detail"]
    # Registering a damaged adapter is refused as well.
    answer = api(cast.bob).post(
        f"{REGISTRY}other/versions/", {"run": registered[0].id}, format="json"
    )
    assert answer.status_code == 404  # no such name yet
    api(cast.bob).post(REGISTRY, {"name": "other"}, format="json")
    answer = api(cast.bob).post(
        f"{REGISTRY}other/versions/", {"run": registered[0].id}, format="json"
    )
    assert answer.status_code == 400 and "is damaged" in answer.json()["detail"]


def test_moving_an_alias_is_audited(api, cast, client, registered):
    answer = api(cast.alice).put(
        f"{REGISTRY}support-bot/aliases/production/", {"version": 2}, format="json"
    )
    assert answer.json()["version"] == 2 and answer.json()["updated_by"] == "alice"
    assert api(cast.bob).delete(f"{REGISTRY}support-bot/aliases/production/").status_code == 204
    events = AuditEvent.objects.filter(action__startswith="registry.alias").order_by("id")
    assert [(e.actor.username, e.detail["from"], e.detail["to"]) for e in events] == [
        ("bob", None, 1),
        ("alice", 1, 2),
        ("bob", 2, None),
    ]
    assert api(cast.carol).get(f"{REGISTRY}support-bot@production/").status_code == 404
    client.force_login(cast.alice)  # the team's audit log says it too
    audit = client.get(reverse("team_audit", args=[cast.acme.id])).content.decode()
    assert "support-bot@production" in audit and "v1 → v2" in audit and "v2 → removed" in audit


def test_viewers_read_members_write_admins_delete(api, cast, registered, adapter_run):
    viewer, member = api(cast.carol), api(cast.bob)
    assert (
        viewer.put(
            f"{REGISTRY}support-bot/aliases/staging/", {"version": 2}, format="json"
        ).status_code
        == 403
    )
    assert (
        viewer.post(
            f"{REGISTRY}support-bot/versions/", {"run": adapter_run().id}, format="json"
        ).status_code
        == 403
    )
    assert viewer.post(REGISTRY, {"name": "mine"}, format="json").status_code == 403
    assert member.delete(f"{REGISTRY}support-bot/versions/2/").status_code == 403
    refused = api(cast.alice).delete(f"{REGISTRY}support-bot/versions/1/")
    assert refused.status_code == 409 and "production" in refused.json()["detail"]
    assert api(cast.alice).delete(f"{REGISTRY}support-bot/versions/2/").status_code == 204
    answer = member.put(f"{REGISTRY}support-bot/aliases/v3/", {"version": 1}, format="json")
    assert answer.status_code == 400 and "not v<number>" in answer.json()["detail"]


def test_another_teams_names_are_404(api, cast, registered):
    mallory = api(cast.mallory)
    for path in (
        "support-bot/",
        "support-bot@production/",
        "support-bot@production/download/",
        "support-bot/versions/1/",
        "support-bot/versions/1/download/",
    ):
        assert mallory.get(REGISTRY + path).status_code == 404, path
    assert (
        mallory.put(
            f"{REGISTRY}support-bot/aliases/production/", {"version": 2}, format="json"
        ).status_code
        == 404
    )
    assert mallory.get(f"{REGISTRY}support-bot/?team={cast.acme.id}").status_code == 404
    assert mallory.get(REGISTRY).json() == []
    # Mallory's own run cannot be registered under Acme's name, and Acme's is 404 to her.
    answer = api(cast.bob).post(f"{REGISTRY}support-bot/versions/", {"run": 10**9}, format="json")
    assert answer.status_code == 404


def test_a_name_in_two_of_your_teams_needs_team(api, cast, registered, adapter_run):
    Membership.objects.create(team=cast.umbrella, user=cast.bob, role=Role.MEMBER)
    bob = api(cast.bob)
    created = bob.post(REGISTRY, {"name": "support-bot", "team": cast.umbrella.id}, format="json")
    assert created.status_code == 201 and created.json()["team"] == "Umbrella"
    answer = bob.get(f"{REGISTRY}support-bot@production/download/")
    assert answer.status_code == 400 and "?team=" in answer.json()["detail"]
    assert bob.get(f"{REGISTRY}support-bot@production/download/?team=Acme").status_code == 200
    assert bob.post(REGISTRY, {"name": "x"}, format="json").status_code == 400  # which team?
    umbrella_run = adapter_run(project=cast.umbrella_project)
    answer = bob.post(
        f"{REGISTRY}support-bot/versions/?team={cast.acme.id}",
        {"run": umbrella_run.id},
        format="json",
    )
    assert answer.status_code == 400 and "belongs to Umbrella" in answer.json()["detail"]
