"""The model registry of adapters (webapp/adapter_registry): names, versions, aliases, the
audit trail, what it does to deleting runs, and its pages (the run page's Register panel)."""

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.urls import reverse

from webapp.accounts.models import AuditEvent, Membership, Role
from webapp.adapter_registry import selectors, services
from webapp.adapter_registry.models import ModelVersion
from webapp.experiments import services as run_services
from webapp.experiments.models import Run, RunStatus

pytestmark = pytest.mark.django_db


@pytest.fixture
def bot(cast):
    return services.registered_create(user=cast.bob, team=cast.acme, name="support-bot")


def test_versions_count_up_and_each_points_at_one_stored_adapter(cast, bot, adapter_run):
    first, second = adapter_run(name="a"), adapter_run(name="b")
    adapter_run.add(second, weights=b"v2" * 100, version=2)
    v1 = services.version_create(user=cast.bob, registered=bot, run=first)
    v2 = services.version_create(user=cast.bob, registered=bot, run=second)  # its newest: 2
    v3 = services.version_create(user=cast.bob, registered=bot, run=second, adapter_version=1)
    assert [(v.number, v.run_id, v.adapter_version) for v in (v1, v2, v3)] == [
        (1, first.id, 1),
        (2, second.id, 2),
        (3, second.id, 1),
    ]
    files = {a.name: a.size for a in selectors.version_files(v2)}
    assert files == {"adapter_config.json": 29, "adapter_model.safetensors": 200}
    with pytest.raises(ValidationError, match="already support-bot v1"):
        services.version_create(user=cast.bob, registered=bot, run=first)
    # A number is never handed out twice, also after the newest version is deleted.
    services.version_delete(user=cast.alice, version=v3)
    v4 = services.version_create(user=cast.bob, registered=bot, run=second, adapter_version=1)
    assert v4.number == 4


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"status": RunStatus.RUNNING}, "only a succeeded run"),
        ({"status": RunStatus.FAILED}, "only a succeeded run"),
        ({"status": RunStatus.RUNNING, "external": True}, "still running"),
    ],
)
def test_an_unfinished_or_failed_run_is_refused(cast, bot, adapter_run, fields, reason):
    with pytest.raises(ValidationError, match=reason):
        services.version_create(user=cast.bob, registered=bot, run=adapter_run(**fields))
    assert not ModelVersion.objects.exists()


def test_an_uploaded_adapter_waiting_for_evaluation_can_be_registered(cast, bot, adapter_run):
    uploaded = adapter_run(status=RunStatus.QUEUED, external=True)
    assert services.version_create(user=cast.bob, registered=bot, run=uploaded).number == 1


def test_refusals_name_the_reason(cast, bot, make_run, adapter_run):
    with pytest.raises(ValidationError, match="has no adapter to register"):
        services.version_create(
            user=cast.bob, registered=bot, run=make_run(status=RunStatus.SUCCEEDED)
        )
    with pytest.raises(ValidationError, match="no adapter version 7"):
        services.version_create(user=cast.bob, registered=bot, run=adapter_run(), adapter_version=7)
    theirs = adapter_run(project=cast.umbrella_project)
    with pytest.raises(ValidationError, match="belongs to Umbrella"):
        services.version_create(user=cast.alice, registered=bot, run=theirs)
    with pytest.raises(PermissionDenied, match="Viewers cannot register"):
        services.version_create(user=cast.carol, registered=bot, run=adapter_run())
    with pytest.raises(ValidationError, match="lower-case letters"):
        services.registered_create(user=cast.bob, team=cast.acme, name="Support Bot")
    with pytest.raises(ValidationError, match="already has a registered model"):
        services.registered_create(user=cast.bob, team=cast.acme, name="support-bot")


def test_moving_an_alias_is_audited_with_who_from_and_to(cast, bot, adapter_run):
    v1 = services.version_create(user=cast.bob, registered=bot, run=adapter_run(name="a"))
    v2 = services.version_create(user=cast.bob, registered=bot, run=adapter_run(name="b"))
    services.alias_set(user=cast.bob, registered=bot, name="production", version=v1)
    services.alias_set(user=cast.alice, registered=bot, name="production", version=v2)
    services.alias_set(user=cast.alice, registered=bot, name="production", version=v2)  # no move
    alias = selectors.alias_get(registered=bot, name="production")
    services.alias_delete(user=cast.bob, registered=bot, alias=alias)
    moves = AuditEvent.objects.filter(action__startswith="registry.alias").order_by("id")
    assert [(e.actor.username, e.action, e.detail["from"], e.detail["to"]) for e in moves] == [
        ("bob", "registry.alias_set", None, 1),
        ("alice", "registry.alias_set", 1, 2),
        ("bob", "registry.alias_delete", 2, None),
    ]
    assert all(e.team == cast.acme and e.target == "support-bot@production" for e in moves)
    with pytest.raises(ValidationError, match="not v<number>"):
        services.alias_set(user=cast.bob, registered=bot, name="v2", version=v2)
    with pytest.raises(PermissionDenied):
        services.alias_set(user=cast.carol, registered=bot, name="staging", version=v2)


def test_a_registered_run_cannot_be_deleted_until_its_version_is(cast, bot, adapter_run):
    run = adapter_run()
    version = services.version_create(user=cast.bob, registered=bot, run=run)
    services.alias_set(user=cast.bob, registered=bot, name="production", version=version)
    with pytest.raises(
        ValidationError, match=r"registered in the model registry \(support-bot v1\)"
    ):
        run_services.run_delete(user=cast.alice, run=run)
    with pytest.raises(ValidationError, match="is production: move or remove that alias"):
        services.version_delete(user=cast.alice, version=version)
    with pytest.raises(PermissionDenied):  # deleting a version is for admins and owners
        services.version_delete(user=cast.bob, version=version)
    services.alias_delete(
        user=cast.bob, registered=bot, alias=selectors.alias_get(registered=bot, name="production")
    )
    services.version_delete(user=cast.alice, version=version)
    run_services.run_delete(user=cast.alice, run=run)
    assert not Run.objects.filter(id=run.id).exists()


def test_a_name_two_of_your_teams_have_needs_the_team(cast, bot):
    Membership.objects.create(team=cast.umbrella, user=cast.bob, role=Role.MEMBER)
    services.registered_create(user=cast.bob, team=cast.umbrella, name="support-bot")
    with pytest.raises(selectors.RegistryAmbiguous, match=r"Acme \(id \d+\), Umbrella"):
        selectors.registered_named_for_user(user=cast.bob, name="support-bot")
    for team in ("Acme", str(cast.acme.id)):
        found = selectors.registered_named_for_user(user=cast.bob, name="support-bot", team=team)
        assert found == bot
    # Alice is only in Acme: the name is unambiguous for her.
    assert selectors.registered_named_for_user(user=cast.alice, name="support-bot") == bot


# ---- pages ----------------------------------------------------------------------------------


def test_register_from_the_run_page_then_alias_it_on_the_registered_models_page(
    client, cast, adapter_run
):
    run = adapter_run(summary={"eval_loss": 0.8125, "eval_accuracy": 0.75})
    client.force_login(cast.bob)
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert "Register adapter" in page and 'name="new_name"' in page

    answer = client.post(reverse("run_register", args=[run.id]), {"new_name": "support-bot"})
    registered = selectors.registered_named_for_user(user=cast.bob, name="support-bot")
    assert answer.url == reverse("registered_detail", args=[registered.id])
    answer = client.post(
        reverse("registry_alias_set", args=[registered.id]), {"alias": "production", "version": 1}
    )
    assert answer.status_code == 302

    html = client.get(reverse("registered_detail", args=[registered.id])).content.decode()
    assert "@production" in html and run.name in html and "eval_loss 0.8125" in html
    assert "eval_accuracy 0.7500" in html and "329\xa0bytes" in html
    assert "production: new → v1" in html.replace("@", "")  # the history
    listing = client.get(reverse("adapter_registry")).content.decode()
    assert "support-bot" in listing and "@production → v1" in listing
    assert "Registered as" in client.get(reverse("run_detail", args=[run.id])).content.decode()

    zipped = client.get(reverse("registry_version_download", args=[registered.id, 1]))
    same = client.get(reverse("run_adapter_download", args=[run.id]))
    assert zipped.status_code == 200
    assert b"".join(zipped.streaming_content) == b"".join(same.streaming_content)
    assert 'filename="support-bot-v1-adapter.zip"' in zipped["Content-Disposition"]


def test_viewers_read_other_teams_get_404(client, cast, bot, adapter_run):
    run = adapter_run()
    services.version_create(user=cast.bob, registered=bot, run=run)
    client.force_login(cast.carol)
    assert (
        "Register adapter" not in client.get(reverse("run_detail", args=[run.id])).content.decode()
    )
    html = client.get(reverse("registered_detail", args=[bot.id])).content.decode()
    assert "Set alias" not in html and "Download" in html
    client.post(reverse("registry_alias_set", args=[bot.id]), {"alias": "prod", "version": 1})
    assert not bot.aliases.exists()  # refused, with a message

    client.force_login(cast.mallory)
    for url in (
        reverse("registered_detail", args=[bot.id]),
        reverse("registry_version_download", args=[bot.id, 1]),
    ):
        assert client.get(url).status_code == 404
    answer = client.post(reverse("registry_alias_set", args=[bot.id]), {"alias": "p", "version": 1})
    assert answer.status_code == 404
    assert "support-bot" not in client.get(reverse("adapter_registry")).content.decode()
