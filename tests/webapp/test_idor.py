"""The IDOR matrix: every kind of team object × every verb, asked by mallory — the owner of
another team, so her role is never the reason — answers 404 in pages, the API and downloads,
changes nothing, and no list shows another team's rows.

Launching *into* another team's project or on its dataset names the object in a form body, not
in the URL: there the answer must be the same as for an id that does not exist (a 400 naming no
object), and no run may appear.
"""

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from webapp.accounts.models import ApiToken, AuditEvent, Invitation, Membership
from webapp.accounts.secrets import secret_digest
from webapp.accounts.services import api_token_create
from webapp.experiments import leases, services
from webapp.experiments.models import (
    Comment,
    PlaygroundPrompt,
    PlaygroundVote,
    Run,
    RunStatus,
    ShareLink,
    Sweep,
)

pytestmark = pytest.mark.django_db

SECRET = "acme-secret"  # every Acme object's name carries it; no answer to mallory may


@pytest.fixture
def acme(cast, make_run):
    """One object of every kind in team Acme."""
    dataset = services.dataset_upload_create(
        user=cast.bob,
        team=cast.acme,
        name=f"{SECRET}-data",
        filename="d.csv",
        data=b"prompt,completion\na,b\nc,d\n",
        task="causal-lm",
    )
    sweep = Sweep.objects.create(
        project=cast.acme_project, name=f"{SECRET}-sweep", base_model="tiny-llama", dataset=dataset
    )
    run = make_run(name=f"{SECRET}-run", dataset=dataset, sweep=sweep)
    fence = leases.run_claim(run_id=run.id, worker="w")
    artifact = leases.artifact_store(
        run_id=run.id, fence=fence, kind="adapter", name="adapter_config.json", data=b"{}"
    )
    finished = make_run(name=f"{SECRET}-finished", status=RunStatus.SUCCEEDED, dataset=dataset)
    comment = services.comment_create(user=cast.bob, run=run, body=f"{SECRET}-comment")
    link, _ = services.share_link_create(user=cast.bob, team=cast.acme, scope="run", run=run)
    token, _ = api_token_create(user=cast.bob, name=f"{SECRET}-token")
    invitation = Invitation.objects.create(
        team=cast.acme,
        digest=secret_digest("pli_x"),
        created_by=cast.alice,
        expires_at=timezone.now() + timedelta(days=1),
    )
    prompt = PlaygroundPrompt.objects.create(
        team=cast.acme, created_by=cast.bob, base_model="tiny-llama", task="causal-lm",
        text=f"{SECRET}-prompt", status="done", answers={"base": {"text": SECRET}},
    )  # fmt: skip
    prompt.runs.set([finished])
    return {
        "prompt": prompt,
        "run": run,
        "finished": finished,
        "sweep": sweep,
        "dataset": dataset,
        "artifact": artifact,
        "comment": comment,
        "link": link,
        "token": token,
        "invitation": invitation,
        "membership": Membership.objects.get(user=cast.bob, team=cast.acme),
        "team": cast.acme,
        "project": cast.acme_project,
    }


def _page_cases(o) -> list[tuple[str, str, str, str, dict]]:
    """(kind, verb, method, url, body) for the browser pages."""
    run, done, mid = o["run"].id, o["finished"].id, o["membership"].id
    return [
        ("run", "read", "get", reverse("run_detail", args=[run]), {}),
        ("run", "read", "get", reverse("run_live", args=[run]), {}),
        ("run", "update", "post", reverse("run_notes", args=[run]), {"notes": "x"}),
        ("run", "update", "post", reverse("run_tags", args=[run]), {"add": "x"}),
        ("run", "update", "post", reverse("run_comment", args=[run]), {"body": "x"}),
        ("run", "delete", "post", reverse("run_delete", args=[done]), {}),
        ("run", "download", "get", reverse("run_adapter_download", args=[run]), {}),
        ("run", "download", "get", reverse("run_metrics_csv", args=[run]), {}),
        ("run", "download", "get", reverse("run_metrics_parquet", args=[run]), {}),
        ("run", "download", "get", reverse("run_merged_download", args=[done]), {}),
        ("run", "share", "post", reverse("run_share", args=[run]), {"days": "7"}),
        ("run", "launch", "get", reverse("run_new") + f"?clone={run}", {}),
        ("run", "cancel", "post", reverse("run_cancel", args=[run]), {}),
        ("sweep", "read", "get", reverse("sweep_detail", args=[o["sweep"].id]), {}),
        ("sweep", "read", "get", reverse("sweep_live", args=[o["sweep"].id]), {}),
        ("sweep", "delete", "post", reverse("sweep_delete", args=[o["sweep"].id]), {}),
        ("sweep", "launch", "get", reverse("sweep_new") + f"?clone={o['sweep'].id}", {}),
        ("dataset", "read", "get", reverse("dataset_detail", args=[o["dataset"].id]), {}),
        ("dataset", "download", "get", reverse("dataset_download", args=[o["dataset"].id]), {}),
        ("dataset", "delete", "post", reverse("dataset_delete", args=[o["dataset"].id]), {}),
        ("comment", "delete", "post", reverse("comment_delete", args=[o["comment"].id]), {}),
        ("share link", "delete", "post", reverse("share_link_revoke", args=[o["link"].id]), {}),
        ("team", "read", "get", reverse("team_detail", args=[o["team"].id]), {}),
        ("team", "read", "get", reverse("team_audit", args=[o["team"].id]), {}),
        ("team", "share", "post", reverse("team_invite", args=[o["team"].id]), {"role": "admin"}),
        (
            "project",
            "launch",
            "post",
            reverse("project_create", args=[o["team"].id]),
            {"name": "p"},
        ),
        (
            "invitation",
            "delete",
            "post",
            reverse("invitation_revoke", args=[o["invitation"].id]),
            {},
        ),
        (
            "membership",
            "update",
            "post",
            reverse("membership_role", args=[mid]),
            {"role": "viewer"},
        ),
        ("membership", "delete", "post", reverse("membership_remove", args=[mid]), {}),
        ("membership", "update", "post", reverse("ownership_transfer", args=[mid]), {}),
        ("api token", "delete", "post", reverse("api_token_revoke", args=[o["token"].id]), {}),
        ("prompt", "read", "get", reverse("playground_prompt", args=[o["prompt"].id]), {}),
        (
            "prompt",
            "update",
            "post",
            reverse("playground_vote", args=[o["prompt"].id]),
            {"choice": "base"},
        ),  # fmt: skip
    ]


def _assert_unchanged(o, cast):
    run = Run.objects.get(id=o["run"].id)
    assert run.notes == "" and not run.cancel_requested and run.status == RunStatus.RUNNING
    assert not run.tags.exists()
    assert Run.objects.filter(id=o["finished"].id).exists()
    assert Sweep.objects.filter(id=o["sweep"].id).exists()
    assert Comment.objects.filter(run__project__team=cast.acme).count() == 1
    assert ShareLink.objects.filter(team=cast.acme).count() == 1
    assert ShareLink.objects.get(id=o["link"].id).revoked_at is None
    assert ApiToken.objects.get(id=o["token"].id).revoked_at is None
    assert Invitation.objects.get(id=o["invitation"].id).revoked_at is None
    assert Membership.objects.get(id=o["membership"].id).role == "member"
    assert not AuditEvent.objects.filter(actor=cast.mallory, team=cast.acme).exists()
    assert cast.acme.projects.count() == 1 and cast.acme.invitations.count() == 1
    assert not PlaygroundVote.objects.exists() and PlaygroundPrompt.objects.count() == 1


def test_pages_answer_404_to_another_team_for_every_kind_and_verb(cast, acme):
    client = Client()
    client.force_login(cast.mallory)
    failures = []
    for kind, verb, method, url, body in _page_cases(acme):
        response = getattr(client, method)(url, body)
        if response.status_code != 404:
            failures.append(f"{kind} {verb}: {method.upper()} {url} → {response.status_code}")
    assert not failures, "\n".join(failures)
    _assert_unchanged(acme, cast)


def test_page_lists_never_show_another_teams_rows(cast, acme):
    client = Client()
    client.force_login(cast.mallory)
    ids = "&".join(f"runs={acme[k].id}" for k in ("run", "finished"))
    for url in (
        reverse("runs"),
        reverse("runs") + f"?sweep={acme['sweep'].id}&dataset={acme['dataset'].id}",
        reverse("datasets"),
        reverse("adapter_upload"),
        reverse("compare") + "?" + ids,
        reverse("compare_csv") + "?" + ids,
        reverse("playground") + f"?runs={acme['finished'].id},{acme['run'].id}",
        reverse("share_links"),
        reverse("teams"),
        reverse("api_tokens"),
    ):
        response = client.get(url)
        assert response.status_code == 200, url
        body = response.content.decode()
        assert SECRET not in body and "Acme" not in body, url


def test_launching_into_another_teams_project_or_dataset_is_a_400_like_a_missing_id(cast, acme):
    client = Client()
    client.force_login(cast.mallory)
    form = {
        "name": "x",
        "base_model": "tiny-llama",
        "method": "lora",
        "r": 8,
        "alpha": 16,
        "dropout": 0.0,
        "target_modules": "default",
        "steps": 1,
        "batch_size": 1,
        "learning_rate": 0.001,
        "max_length": 64,
        "eval_every": 0,
    }
    theirs = {"project": acme["project"].id, "dataset": acme["dataset"].id}
    missing = {"project": 999_999, "dataset": 999_999}
    answers = [client.post(reverse("run_new"), form | ids) for ids in (theirs, missing)]
    # Same page but for the per-response CSRF mask.
    bodies = [re.sub(r"[A-Za-z0-9]{64}", "CSRF", a.content.decode()) for a in answers]
    assert [a.status_code for a in answers] == [400, 400]
    assert bodies[0] == bodies[1]
    assert "Select a valid choice" in bodies[0]
    assert SECRET not in bodies[0]
    assert not Run.objects.filter(created_by=cast.mallory).exists()


def test_the_launch_estimate_treats_another_teams_dataset_like_a_missing_id(cast, acme):
    """The estimate panel reads the form's dataset and the team's past runs: another team's
    dataset is no valid choice, and another team's runs never time mallory's."""
    client = Client()
    client.force_login(cast.mallory)
    acme["finished"].profile = {"wall_s": 60.0, "peak_memory_mb": 1.0, "memory_kind": "cuda"}
    acme["finished"].save(update_fields=["profile"])
    form = {"name": "x", "project": cast.umbrella_project.id, "base_model": "tiny-llama"}
    form |= {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "default"}
    form |= {"steps": 5, "batch_size": 1, "learning_rate": 0.001, "max_length": 64}
    form |= {"eval_every": 0}
    url = reverse("run_estimate")
    answers = [client.get(url, form | {"dataset": d}) for d in (acme["dataset"].id, 999_999)]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].content == answers[1].content
    assert b"Fix the form" in answers[0].content
    builtin = client.get(url, form | {"dataset": cast.datasets["sample-instructions"].id})
    body = builtin.content.decode()
    assert builtin.status_code == 200 and "no similar run yet" in body
    assert SECRET not in body


# ---- the same matrix through the REST API, with mallory's own token ------------------------


def _api_cases(o) -> list[tuple[str, str, str, str, dict]]:
    run, done = o["run"].id, o["finished"].id
    points = {"points": [{"key": "x", "step": 1, "value": 1.0}]}
    return [
        ("run", "read", "get", f"/api/v1/runs/{run}/", {}),
        ("run", "read", "get", f"/api/v1/runs/{run}/metrics/", {}),
        ("run", "update", "post", f"/api/v1/runs/{run}/metrics/", points),
        ("run", "update", "post", f"/api/v1/runs/{run}/finish/", {"status": "failed"}),
        ("run", "delete", "delete", f"/api/v1/runs/{done}/", {}),
        ("run", "cancel", "post", f"/api/v1/runs/{run}/cancel/", {}),
        ("run", "download", "get", f"/api/v1/runs/{run}/artifacts/", {}),
        ("run", "download", "get", f"/api/v1/runs/{done}/merged/", {}),
        ("artifact", "download", "get", f"/api/v1/artifacts/{o['artifact'].id}/download/", {}),
        ("sweep", "read", "get", f"/api/v1/sweeps/{o['sweep'].id}/", {}),
        ("dataset", "read", "get", f"/api/v1/datasets/{o['dataset'].id}/", {}),
        ("dataset", "download", "get", f"/api/v1/datasets/{o['dataset'].id}/rows.jsonl", {}),
        ("dataset", "delete", "delete", f"/api/v1/datasets/{o['dataset'].id}/", {}),
    ]


@pytest.fixture
def mallory_api(cast):
    from rest_framework.test import APIClient

    _, plain = api_token_create(user=cast.mallory, name="m")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plain}")
    return client


def test_api_answers_404_to_another_team_for_every_kind_and_verb(cast, acme, mallory_api):
    failures = []
    for kind, verb, method, url, body in _api_cases(acme):
        response = getattr(mallory_api, method)(url, body, format="json")
        if response.status_code != 404:
            failures.append(f"{kind} {verb}: {method.upper()} {url} → {response.status_code}")
    assert not failures, "\n".join(failures)
    _assert_unchanged(acme, cast)
    assert not acme["run"].metric_points.exists()


def test_api_lists_never_show_another_teams_rows(cast, acme, mallory_api):
    for url in (
        "/api/v1/runs/",
        f"/api/v1/runs/?sweep={acme['sweep'].id}",
        "/api/v1/sweeps/",
        "/api/v1/datasets/",
        "/api/v1/projects/",
        "/api/v1/me/",
    ):
        response = mallory_api.get(url)
        assert response.status_code == 200, url
        body = response.content.decode()
        assert SECRET not in body and "Acme" not in body, url


def test_api_launch_into_another_teams_project_is_answered_like_a_missing_id(
    cast, acme, mallory_api
):
    body = {"base_model": "tiny-llama", "method": "lora", "train_config": {"steps": 1}}
    theirs = mallory_api.post(
        "/api/v1/runs/",
        body | {"project": acme["project"].id, "dataset": acme["dataset"].id},
        format="json",
    )
    missing = mallory_api.post(
        "/api/v1/runs/", body | {"project": 999_999, "dataset": 999_999}, format="json"
    )
    assert theirs.status_code == missing.status_code == 400
    assert theirs.json().keys() == missing.json().keys()
    assert SECRET not in theirs.content.decode()
    assert not Run.objects.filter(created_by=cast.mallory).exists()
