"""Notes, comments, clone-run, deletion and read-only share links on the pages."""

import io
import re
import zipfile
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from webapp.accounts.models import AuditEvent, Membership, Role
from webapp.accounts.secrets import secret_digest
from webapp.experiments import leases, services
from webapp.experiments.models import Comment, Run, RunStatus, ShareLink, Sweep

pytestmark = pytest.mark.django_db

SHARE_URL = re.compile(r'value="(http://testserver/s/(pls_[A-Za-z0-9_-]+)/)"')


def _login(client, user):
    client.force_login(user)
    return client


def _share(client, run) -> tuple[str, str]:
    response = client.post(reverse("run_share", args=[run.id]), {"days": "7"})
    assert response.status_code == 200
    url, secret = SHARE_URL.search(response.content.decode()).groups()
    return url, secret


def _finished(make_run, **fields) -> Run:
    return make_run(status=RunStatus.SUCCEEDED, step=5, **fields)


# ---- notes and comments ---------------------------------------------------------------------


def test_member_saves_notes_and_they_render_as_text(client, cast, make_run):
    run = make_run()
    _login(client, cast.bob)
    client.post(reverse("run_notes", args=[run.id]), {"notes": "<b>try r=16</b>\nnext"})
    run.refresh_from_db()
    assert run.notes == "<b>try r=16</b>\nnext"
    _login(client, cast.carol)
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert "&lt;b&gt;try r=16&lt;/b&gt;<br>next" in page
    assert 'name="notes"' not in page  # the viewer gets no editor


def test_viewer_cannot_write_notes_or_comments(client, cast, make_run):
    run = make_run(notes="kept")
    _login(client, cast.carol)
    client.post(reverse("run_notes", args=[run.id]), {"notes": "changed"})
    client.post(reverse("run_comment", args=[run.id]), {"body": "hello"})
    run.refresh_from_db()
    assert run.notes == "kept"
    assert not Comment.objects.exists()


def test_comments_post_escape_and_delete_by_author_or_admin(client, cast, make_run):
    run = make_run()
    _login(client, cast.bob)
    client.post(reverse("run_comment", args=[run.id]), {"body": "<script>x()</script> loss ok"})
    comment = Comment.objects.get()
    assert comment.author == cast.bob
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert "&lt;script&gt;x()&lt;/script&gt; loss ok" in page
    # Another member may not delete bob's comment; the owner (admin powers) may.
    Membership.objects.create(team=cast.acme, user=_user("erin"), role=Role.MEMBER)
    _login(client, _user("erin"))
    client.post(reverse("comment_delete", args=[comment.id]))
    assert Comment.objects.filter(id=comment.id).exists()
    _login(client, cast.alice)
    client.post(reverse("comment_delete", args=[comment.id]))
    assert not Comment.objects.filter(id=comment.id).exists()


def test_empty_and_oversized_comments_are_refused(client, cast, make_run):
    run = make_run()
    _login(client, cast.bob)
    client.post(reverse("run_comment", args=[run.id]), {"body": "   "})
    response = client.post(reverse("run_comment", args=[run.id]), {"body": "x" * 5001}, follow=True)
    assert "A comment has 1 to 5,000 characters." in response.content.decode()
    assert not Comment.objects.exists()


def _user(name):
    from django.contrib.auth import get_user_model

    user, _ = get_user_model().objects.get_or_create(username=name)
    return user


# ---- clone ------------------------------------------------------------------------------


def test_clone_run_prefills_the_form(client, cast, make_run):
    run = make_run(
        name="dora-r4",
        method="dora",
        method_config={"r": 4, "alpha": 8.0, "dropout": 0.1, "use_rslora": True},
        train_config={
            "steps": 12,
            "batch_size": 2,
            "learning_rate": 0.002,
            "max_length": 64,
            "eval_every": 3,
        },
    )
    _login(client, cast.bob)
    page = client.get(reverse("run_new") + f"?clone={run.id}").content.decode()
    assert 'value="dora-r4 (clone)"' in page
    assert re.search(r'<option value="dora" selected>', page)
    assert re.search(r'name="r" value="4"', page)
    assert re.search(r'name="alpha" value="8.0"', page)
    assert re.search(r'name="steps" value="12"', page)
    assert re.search(r'name="use_rslora"[^>]*checked', page)


def test_clone_of_another_teams_run_is_404(client, cast, make_run):
    run = make_run(project=cast.umbrella_project, created_by=cast.mallory)
    _login(client, cast.bob)
    assert client.get(reverse("run_new") + f"?clone={run.id}").status_code == 404


# ---- deletion ------------------------------------------------------------------------------


def test_only_admins_delete_runs_and_deletion_is_audited(client, cast, make_run):
    run = _finished(make_run)
    _login(client, cast.bob)
    response = client.post(reverse("run_delete", args=[run.id]), follow=True)
    assert "Only a team admin or owner can delete." in response.content.decode()
    assert Run.objects.filter(id=run.id).exists()
    _login(client, cast.alice)
    assert client.post(reverse("run_delete", args=[run.id])).status_code == 302
    assert not Run.objects.filter(id=run.id).exists()
    event = AuditEvent.objects.get(action="run.delete")
    assert (event.team, event.actor) == (cast.acme, cast.alice)
    assert "lora-r8" in event.target


def test_a_running_run_is_not_deleted(client, cast, make_run):
    run = make_run(status=RunStatus.RUNNING)
    _login(client, cast.alice)
    response = client.post(reverse("run_delete", args=[run.id]), follow=True)
    assert "Cancel the run first" in response.content.decode()
    assert Run.objects.filter(id=run.id).exists()


def test_sweep_delete_takes_its_runs(client, cast, make_run):
    sweep = Sweep.objects.create(
        project=cast.acme_project,
        name="s",
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
    )
    runs = [_finished(make_run, sweep=sweep), _finished(make_run, sweep=sweep)]
    _login(client, cast.alice)
    client.post(reverse("sweep_delete", args=[sweep.id]))
    assert not Sweep.objects.filter(id=sweep.id).exists()
    assert not Run.objects.filter(id__in=[r.id for r in runs]).exists()


# ---- share links ---------------------------------------------------------------------------


def test_run_share_link_is_shown_once_and_stored_hashed(client, cast, make_run):
    run = _finished(make_run, summary={"eval_loss": 1.25})
    _login(client, cast.bob)
    url, secret = _share(client, run)
    link = ShareLink.objects.get()
    assert link.digest == secret_digest(secret) and secret not in link.digest
    assert len(secret) > len("pls_") + 42  # 32 random bytes in base64: 256 bits
    # The run page lists the link but never shows the secret again.
    assert secret not in client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert AuditEvent.objects.filter(action="share_link.create", team=cast.acme).exists()


def test_anonymous_visitor_reads_the_shared_run_and_downloads_its_adapter(client, cast, make_run):
    run = _finished(make_run, name="shared <i>run</i>", summary={"eval_loss": 1.25})
    claim_fence = _store_adapter(run)
    assert claim_fence
    _login(client, cast.bob)
    url, secret = _share(client, run)
    stranger = Client()
    response = stranger.get(url)
    page = response.content.decode()
    assert response.status_code == 200
    assert "shared &lt;i&gt;run&lt;/i&gt;" in page and "1.2500" in page
    assert response["Referrer-Policy"] == "no-referrer"
    assert "Cancel run" not in page and "csrfmiddlewaretoken" not in page
    assert 'name="notes"' not in page and "Comments" not in page
    live = stranger.get(reverse("share_live", args=[secret]))
    assert live.status_code == 286
    zipped = stranger.get(reverse("share_adapter", args=[secret]))
    archive = zipfile.ZipFile(io.BytesIO(b"".join(zipped.streaming_content)))
    assert archive.read("adapter_config.json") == b'{"peft_type": "LORA"}'


def _store_adapter(run) -> int:
    Run.objects.filter(id=run.id).update(status=RunStatus.QUEUED)
    fence = leases.run_claim(run_id=run.id, worker="test")
    leases.artifact_store(
        run_id=run.id,
        fence=fence,
        kind="adapter",
        name="adapter_config.json",
        data=b'{"peft_type": "LORA"}',
    )
    leases.run_finish(run_id=run.id, fence=fence, status=RunStatus.SUCCEEDED)
    return fence


def test_revoked_expired_and_unknown_links_are_404(client, cast, make_run):
    run = _finished(make_run)
    _login(client, cast.bob)
    url, secret = _share(client, run)
    stranger = Client()
    assert stranger.get(url).status_code == 200
    other_last = "B" if secret.endswith("A") else "A"
    assert stranger.get(url.replace(secret, secret[:-1] + other_last)).status_code == 404
    link = ShareLink.objects.get()
    ShareLink.objects.filter(id=link.id).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert stranger.get(url).status_code == 404
    ShareLink.objects.filter(id=link.id).update(expires_at=timezone.now() + timedelta(days=1))
    assert stranger.get(url).status_code == 200
    client.post(reverse("share_link_revoke", args=[link.id]))
    for path in (
        url,
        reverse("share_live", args=[secret]),
        reverse("share_adapter", args=[secret]),
    ):
        assert stranger.get(path).status_code == 404
    assert AuditEvent.objects.filter(action="share_link.revoke").count() == 1


def test_viewer_cannot_share_and_other_team_cannot_revoke(client, cast, make_run):
    run = _finished(make_run)
    _login(client, cast.carol)
    response = client.post(reverse("run_share", args=[run.id]), {"days": "7"}, follow=True)
    assert "Viewers cannot create share links." in response.content.decode()
    assert not ShareLink.objects.exists()
    _login(client, cast.bob)
    _share(client, run)
    link = ShareLink.objects.get()
    _login(client, cast.mallory)
    assert client.post(reverse("share_link_revoke", args=[link.id])).status_code == 404
    assert client.post(reverse("run_share", args=[run.id]), {"days": "7"}).status_code == 404
    link.refresh_from_db()
    assert link.revoked_at is None


def test_share_lifetime_is_bounded(client, cast, make_run):
    run = _finished(make_run)
    _login(client, cast.bob)
    for days in ("0", "9999", "x"):
        client.post(reverse("run_share", args=[run.id]), {"days": days})
    assert not ShareLink.objects.exists()


def test_shared_comparison_shows_only_the_teams_runs(client, cast, make_run):
    ours = [_finished(make_run, name=f"ours-{i}") for i in range(2)]
    theirs = _finished(make_run, name="theirs", project=cast.umbrella_project)
    _login(client, cast.bob)
    ids = [ours[0].id, theirs.id, ours[1].id]
    response = client.post(reverse("compare_share"), {"runs": ids, "days": "1"})
    url = SHARE_URL.search(response.content.decode()).group(1)
    assert ShareLink.objects.get().run_ids == [ours[0].id, ours[1].id]
    page = Client().get(url).content.decode()
    assert "ours-0" in page and "ours-1" in page and "theirs" not in page
    assert "Compare 2 runs" in page


def test_a_run_moved_out_of_the_team_disappears_from_its_link(client, cast, make_run):
    run = _finished(make_run)
    _login(client, cast.bob)
    url, _ = _share(client, run)
    Run.objects.filter(id=run.id).update(project=cast.umbrella_project)
    assert Client().get(url).status_code == 404


def test_dataset_delete_by_admin_refused_while_runs_use_it(client, cast, make_run):
    from webapp.experiments.models import Dataset

    dataset = services.dataset_upload_create(
        user=cast.bob,
        team=cast.acme,
        name="d",
        filename="d.csv",
        data=b"prompt,completion\na,b\nc,d\n",
        task="causal-lm",
    )
    run = _finished(make_run, dataset=dataset)
    _login(client, cast.bob)
    assert (
        "Delete</button>"
        not in client.get(reverse("dataset_detail", args=[dataset.id])).content.decode()
    )
    _login(client, cast.alice)
    page = client.get(reverse("dataset_detail", args=[dataset.id])).content.decode()
    assert "Delete</button>" in page
    response = client.post(reverse("dataset_delete", args=[dataset.id]), follow=True)
    assert "Runs use this dataset" in response.content.decode()
    run.delete()
    client.post(reverse("dataset_delete", args=[dataset.id]))
    assert not Dataset.objects.filter(id=dataset.id).exists()
    builtin = cast.datasets["sample-instructions"]
    response = client.post(reverse("dataset_delete", args=[builtin.id]), follow=True)
    assert "Built-in datasets cannot be deleted." in response.content.decode()
