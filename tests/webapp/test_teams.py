"""Teams, invitations, memberships, API tokens and the audit log: the services' rules and the
pages that call them. Another team's ids are 404; a role that lacks the right gets 403 or a
refusal message."""

import io
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.management import CommandError, call_command
from django.db import connection
from django.http import Http404
from django.urls import reverse
from django.utils import timezone

from webapp.accounts import selectors, services
from webapp.accounts.models import ApiToken, AuditEvent, Invitation, Membership, Role, Team
from webapp.accounts.secrets import secret_digest
from webapp.experiments.models import Project

pytestmark = pytest.mark.django_db


def _membership(user, team) -> Membership:
    return Membership.objects.get(user=user, team=team)


def _actions(team=None) -> list[str]:
    events = AuditEvent.objects.all() if team is None else AuditEvent.objects.filter(team=team)
    return list(events.values_list("action", flat=True))


def _invite(cast, role=Role.MEMBER) -> str:
    _, secret = services.invitation_create(user=cast.alice, team=cast.acme, role=role)
    return secret


def _new_user(username: str):
    return get_user_model().objects.create_user(username=username, password=f"{username}-pw-9")


# ---- teams and projects -------------------------------------------------------------------


def test_team_create_makes_an_owner_and_a_default_project(cast):
    team = services.team_create(user=cast.bob, name="  Bob's lab ")
    assert team.name == "Bob's lab"
    assert _membership(cast.bob, team).role == Role.OWNER
    assert list(Project.objects.filter(team=team).values_list("name", flat=True)) == ["Default"]
    assert _actions(team) == ["team.create"]


def test_team_names_are_unique_and_bounded(cast):
    with pytest.raises(ValidationError):
        services.team_create(user=cast.bob, name="acme")
    with pytest.raises(ValidationError):
        services.team_create(user=cast.bob, name="x" * 101)
    with pytest.raises(ValidationError):
        services.team_create(user=cast.bob, name="   ")


def test_teams_page_lists_my_teams_and_creates_one(client, cast):
    client.force_login(cast.bob)
    page = client.get(reverse("teams")).content.decode()
    assert "Acme" in page and "Member" in page and "Umbrella" not in page
    response = client.post(reverse("teams"), {"name": "Skunkworks"})
    team = Team.objects.get(name="Skunkworks")
    assert response.status_code == 302
    assert response["Location"] == reverse("team_detail", args=[team.id])
    assert client.post(reverse("teams"), {"name": "Skunkworks"}).status_code == 400


def test_project_create_is_for_admins(cast):
    project = services.project_create(user=cast.alice, team=cast.acme, name="Ablations")
    assert project.team == cast.acme
    assert "project.create" in _actions(cast.acme)
    with pytest.raises(PermissionDenied):
        services.project_create(user=cast.bob, team=cast.acme, name="Mine")
    with pytest.raises(ValidationError):
        services.project_create(user=cast.alice, team=cast.acme, name="default")


def test_team_page_shows_controls_by_role(client, cast):
    url = reverse("team_detail", args=[cast.acme.id])
    client.force_login(cast.alice)
    owner_page = client.get(url).content.decode()
    for control in ("Make owner", "Remove", "Create an invitation link", "Audit log"):
        assert control in owner_page
    client.force_login(cast.carol)
    viewer_page = client.get(url).content.decode()
    assert "alice" in viewer_page and "bob" in viewer_page and "Leave team" in viewer_page
    for control in ("Make owner", "Remove", "Create an invitation link", "Audit log"):
        assert control not in viewer_page
    client.force_login(cast.mallory)
    assert client.get(url).status_code == 404


# ---- invitations --------------------------------------------------------------------------


def test_invitation_link_is_shown_once_and_stored_hashed(client, cast):
    client.force_login(cast.alice)
    response = client.post(reverse("team_invite", args=[cast.acme.id]), {"role": "viewer"})
    assert response.status_code == 200
    invitation = Invitation.objects.get()
    assert invitation.role == Role.VIEWER
    url = response.context["invite_url"]
    assert url.startswith("http://testserver/invite/pli_")
    secret = url.rstrip("/").rsplit("/", 1)[1]
    assert invitation.digest != secret and secret not in invitation.digest
    assert url in response.content.decode() and "no-store" in response["Cache-Control"]
    assert secret not in client.get(reverse("team_detail", args=[cast.acme.id])).content.decode()
    assert invitation.expires_at - timezone.now() > timedelta(days=6)


def test_invitation_create_rules(cast):
    with pytest.raises(PermissionDenied):
        services.invitation_create(user=cast.bob, team=cast.acme, role=Role.VIEWER)
    with pytest.raises(ValidationError):
        services.invitation_create(user=cast.alice, team=cast.acme, role=Role.OWNER)


def test_logged_in_user_joins_through_the_link(client, cast):
    secret = _invite(cast, Role.MEMBER)
    dave = _new_user("dave")
    client.force_login(dave)
    url = reverse("invitation_accept", args=[secret])
    page = client.get(url).content.decode()
    assert "Join Acme" in page and "Member" in page
    response = client.post(url)
    assert response["Location"] == reverse("team_detail", args=[cast.acme.id])
    assert _membership(dave, cast.acme).role == Role.MEMBER
    invitation = Invitation.objects.get()
    assert invitation.accepted_by == dave and invitation.accepted_at is not None
    assert "invitation.accept" in _actions(cast.acme)
    # One use: the link is dead for everyone now.
    assert client.get(url).status_code == 404
    client.logout()
    assert client.get(url).status_code == 404


def test_anonymous_visitor_signs_up_through_the_link(client, cast):
    secret = _invite(cast, Role.VIEWER)
    url = reverse("invitation_accept", args=[secret])
    page = client.get(url).content.decode()
    assert "Acme" in page and "Viewer" in page and "password2" in page
    assert f"{reverse('login')}?next=" in page
    weak = {"username": "erin", "password1": "erin", "password2": "erin"}
    assert client.post(url, weak).status_code == 400
    assert not get_user_model().objects.filter(username="erin").exists()
    strong = {"username": "erin", "password1": "tall-Walnut-93", "password2": "tall-Walnut-93"}
    response = client.post(url, strong)
    assert response.status_code == 302 and response["Location"] == reverse("runs")
    erin = get_user_model().objects.get(username="erin")
    assert _membership(erin, cast.acme).role == Role.VIEWER
    assert client.get(reverse("runs")).status_code == 200  # logged in
    assert client.get(url).status_code == 404


def test_signup_through_a_link_taken_meanwhile_creates_no_account(cast):
    invitation = Invitation.objects.get(digest=secret_digest(_invite(cast)))
    services.invitation_accept(user=_new_user("dave"), invitation=invitation)
    with pytest.raises(Http404):
        services.invitation_accept_signup(
            username="erin", password="tall-Walnut-93", invitation=invitation
        )
    assert not get_user_model().objects.filter(username="erin").exists()


@pytest.mark.parametrize("death", ["revoked", "expired", "accepted"])
def test_dead_invitations_are_404(client, cast, death):
    secret = _invite(cast)
    now = timezone.now()
    fields = {
        "revoked": {"revoked_at": now},
        "expired": {"expires_at": now - timedelta(seconds=1)},
        "accepted": {"accepted_at": now, "accepted_by": cast.bob},
    }[death]
    Invitation.objects.update(**fields)
    url = reverse("invitation_accept", args=[secret])
    assert client.get(url).status_code == 404
    client.force_login(_new_user("dave"))
    assert client.post(url).status_code == 404
    assert not Membership.objects.filter(user__username="dave").exists()


def test_unknown_invitation_is_a_bare_404(client, cast):
    _invite(cast)
    response = client.get(reverse("invitation_accept", args=["pli_" + "A" * 43]))
    assert response.status_code == 404
    assert b"Acme" not in response.content


def test_a_member_cannot_accept_twice(client, cast):
    secret = _invite(cast, Role.ADMIN)
    client.force_login(cast.bob)
    url = reverse("invitation_accept", args=[secret])
    assert "already a member" in client.get(url).content.decode()
    response = client.post(url, follow=True)
    assert "already a member" in response.content.decode()
    assert _membership(cast.bob, cast.acme).role == Role.MEMBER
    assert Invitation.objects.get().accepted_at is None


def test_invitation_revoke(client, cast):
    secret = _invite(cast)
    invitation = Invitation.objects.get()
    client.force_login(cast.bob)
    client.post(reverse("invitation_revoke", args=[invitation.id]))
    assert client.get(reverse("invitation_accept", args=[secret])).status_code == 200
    client.force_login(cast.mallory)
    assert client.post(reverse("invitation_revoke", args=[invitation.id])).status_code == 404
    client.force_login(cast.alice)
    client.post(reverse("invitation_revoke", args=[invitation.id]))
    assert client.get(reverse("invitation_accept", args=[secret])).status_code == 404
    assert _actions(cast.acme).count("invitation.revoke") == 1


# ---- roles, removal, ownership ------------------------------------------------------------


@pytest.fixture
def dave(cast):
    """An admin of Acme."""
    user = _new_user("dave")
    Membership.objects.create(team=cast.acme, user=user, role=Role.ADMIN)
    return user


def test_admin_changes_roles_below_owner(cast, dave):
    bob = _membership(cast.bob, cast.acme)
    services.membership_role_change(user=dave, membership=bob, role=Role.VIEWER)
    assert _membership(cast.bob, cast.acme).role == Role.VIEWER
    event = AuditEvent.objects.get(action="membership.role_change")
    assert event.detail == {"from": "member", "to": "viewer"} and event.target == "bob"
    with pytest.raises(PermissionDenied):
        services.membership_role_change(user=dave, membership=bob, role=Role.OWNER)
    with pytest.raises(PermissionDenied):
        services.membership_role_change(
            user=dave, membership=_membership(cast.alice, cast.acme), role=Role.MEMBER
        )
    with pytest.raises(PermissionDenied):
        services.membership_role_change(user=cast.bob, membership=bob, role=Role.ADMIN)


def test_the_last_owner_cannot_be_demoted_or_leave(cast):
    alice = _membership(cast.alice, cast.acme)
    with pytest.raises(ValidationError, match="at least one owner"):
        services.membership_role_change(user=cast.alice, membership=alice, role=Role.ADMIN)
    with pytest.raises(ValidationError, match="at least one owner"):
        services.membership_remove(user=cast.alice, membership=alice)
    # With a second owner, the first may step down.
    bob = _membership(cast.bob, cast.acme)
    services.membership_role_change(user=cast.alice, membership=bob, role=Role.OWNER)
    services.membership_role_change(user=cast.alice, membership=alice, role=Role.ADMIN)
    assert _membership(cast.alice, cast.acme).role == Role.ADMIN


def test_remove_and_leave(cast, dave):
    services.membership_remove(user=dave, membership=_membership(cast.bob, cast.acme))
    assert not Membership.objects.filter(user=cast.bob, team=cast.acme).exists()
    with pytest.raises(PermissionDenied):
        services.membership_remove(user=dave, membership=_membership(cast.alice, cast.acme))
    with pytest.raises(PermissionDenied):
        services.membership_remove(user=cast.carol, membership=_membership(dave, cast.acme))
    services.membership_remove(user=cast.carol, membership=_membership(cast.carol, cast.acme))
    assert _actions(cast.acme).count("membership.remove") == 1
    assert _actions(cast.acme).count("membership.leave") == 1


def test_leave_through_the_page(client, cast):
    client.force_login(cast.carol)
    carol = _membership(cast.carol, cast.acme)
    response = client.post(reverse("membership_remove", args=[carol.id]))
    assert response["Location"] == reverse("teams")
    assert client.get(reverse("team_detail", args=[cast.acme.id])).status_code == 404


def test_ownership_transfer(client, cast):
    bob = _membership(cast.bob, cast.acme)
    with pytest.raises(PermissionDenied):
        services.ownership_transfer(user=cast.bob, team=cast.acme, new_owner_membership=bob)
    client.force_login(cast.alice)
    client.post(reverse("ownership_transfer", args=[bob.id]))
    assert _membership(cast.bob, cast.acme).role == Role.OWNER
    assert _membership(cast.alice, cast.acme).role == Role.ADMIN
    event = AuditEvent.objects.get(action="ownership.transfer")
    assert event.actor == cast.alice and event.target == "bob"


def test_membership_pages_of_another_team_are_404(client, cast):
    client.force_login(cast.mallory)
    bob = _membership(cast.bob, cast.acme)
    for name in ("membership_role", "membership_remove", "ownership_transfer"):
        assert client.post(reverse(name, args=[bob.id]), {"role": "viewer"}).status_code == 404
    assert client.post(reverse("team_invite", args=[cast.acme.id])).status_code == 404
    assert client.post(reverse("project_create", args=[cast.acme.id])).status_code == 404
    assert _membership(cast.bob, cast.acme).role == Role.MEMBER


def test_role_change_through_the_page(client, cast):
    client.force_login(cast.alice)
    bob = _membership(cast.bob, cast.acme)
    response = client.post(reverse("membership_role", args=[bob.id]), {"role": "admin"})
    assert response.status_code == 302
    assert _membership(cast.bob, cast.acme).role == Role.ADMIN
    client.force_login(cast.carol)
    response = client.post(
        reverse("membership_role", args=[bob.id]), {"role": "viewer"}, follow=True
    )
    assert "Only a team admin or owner" in response.content.decode()
    assert _membership(cast.bob, cast.acme).role == Role.ADMIN


# ---- API tokens ---------------------------------------------------------------------------


def _columns_hold(value: str) -> bool:
    """Whether any text column of the token table holds `value`."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {ApiToken._meta.db_table}")
        return any(value in str(cell) for row in cursor.fetchall() for cell in row)


def test_token_page_shows_the_secret_once_and_stores_its_digest(client, cast):
    client.force_login(cast.alice)
    response = client.post(reverse("api_tokens"), {"name": "laptop"})
    secret = response.context["secret"]
    page = response.content.decode()
    assert secret.startswith("plt_") and secret in page
    assert f"peftlab login --url http://testserver --token {secret}" in page
    assert f"Authorization: Bearer {secret}" in page and "/api/v1/me/" in page
    assert "no-store" in response["Cache-Control"]
    token = ApiToken.objects.get()
    assert token.name == "laptop" and token.digest != secret and not _columns_hold(secret)
    reloaded = client.get(reverse("api_tokens")).content.decode()
    assert secret not in reloaded and token.prefix in reloaded
    assert services.api_token_authenticate(plain=secret) == token


def test_token_name_is_required_and_bounded(client, cast):
    client.force_login(cast.alice)
    assert client.post(reverse("api_tokens"), {"name": ""}).status_code == 400
    assert client.post(reverse("api_tokens"), {"name": "x" * 101}).status_code == 400
    assert not ApiToken.objects.exists()


def test_token_revoke_and_someone_elses_token_is_404(client, cast):
    token, secret = services.api_token_create(user=cast.alice, name="ci")
    client.force_login(cast.bob)
    assert client.post(reverse("api_token_revoke", args=[token.id])).status_code == 404
    assert services.api_token_authenticate(plain=secret) is not None
    client.force_login(cast.alice)
    assert client.get(reverse("api_token_revoke", args=[token.id])).status_code == 405
    response = client.post(reverse("api_token_revoke", args=[token.id]))
    assert response["Location"] == reverse("api_tokens")
    assert services.api_token_authenticate(plain=secret) is None
    assert "revoked" in client.get(reverse("api_tokens")).content.decode()
    with pytest.raises(Http404):
        selectors.api_token_get_for_user(user=cast.bob, token_id=token.id)


def test_create_api_token_command_prints_a_working_token(cast):
    out = io.StringIO()
    call_command("create_api_token", "bob", "--name", "ci", stdout=out)
    plain = out.getvalue().strip()
    assert "\n" not in plain
    token = services.api_token_authenticate(plain=plain)
    assert token.user == cast.bob and token.name == "ci"
    assert "api_token.create" in _actions()
    with pytest.raises(CommandError):
        call_command("create_api_token", "nobody", stdout=io.StringIO())


# ---- login and the audit log --------------------------------------------------------------


def test_login_and_failed_login_are_audited(client, cast):
    client.post(reverse("login"), {"username": "alice", "password": "wrong"})
    failed = AuditEvent.objects.get(action="login.failed")
    assert failed.detail == {"username": "alice"} and failed.ip == "127.0.0.1"
    assert failed.actor is None
    client.post(reverse("login"), {"username": "x" * 500, "password": "wrong"})
    assert len(AuditEvent.objects.filter(action="login.failed").first().target) <= 200
    response = client.post(reverse("login"), {"username": "alice", "password": "alice-pw-9"})
    assert response.status_code == 302
    login = AuditEvent.objects.get(action="login")
    assert login.actor == cast.alice and login.ip == "127.0.0.1"


def test_audit_page_is_for_admins(client, cast):
    url = reverse("team_audit", args=[cast.acme.id])
    for user in (cast.bob, cast.carol):
        client.force_login(user)
        response = client.get(url)
        assert response.status_code == 403
        assert "Only a team admin or owner" in response.content.decode()
    client.force_login(cast.mallory)
    assert client.get(url).status_code == 404
    client.force_login(cast.alice)
    assert client.get(url).status_code == 200


def test_audit_log_holds_every_action(client, cast, dave):
    """One of each: they all show on the team's audit page, with actor and IP."""
    client.post(reverse("login"), {"username": "bob", "password": "nope"})
    client.post(reverse("login"), {"username": "mallory", "password": "nope"})
    client.force_login(cast.alice)
    client.post(reverse("api_tokens"), {"name": "laptop"})
    client.post(reverse("api_token_revoke", args=[ApiToken.objects.get().id]))
    client.post(reverse("project_create", args=[cast.acme.id]), {"name": "Ablations"})
    client.post(reverse("team_invite", args=[cast.acme.id]), {"role": "member"})
    invitation = Invitation.objects.get()
    client.post(reverse("invitation_revoke", args=[invitation.id]))
    secret = _invite(cast)
    erin = _new_user("erin")
    services.invitation_accept(user=erin, invitation=selectors.invitation_resolve(secret=secret))
    bob, carol = _membership(cast.bob, cast.acme), _membership(cast.carol, cast.acme)
    client.post(reverse("membership_role", args=[bob.id]), {"role": "viewer"})
    client.post(reverse("membership_remove", args=[carol.id]))
    client.post(reverse("ownership_transfer", args=[_membership(dave, cast.acme).id]))
    services.membership_remove(user=erin, membership=_membership(erin, cast.acme))
    client.post(reverse("login"), {"username": "alice", "password": "alice-pw-9"})

    events = selectors.audit_list_for_team(user=cast.alice, team=cast.acme)
    actions = set(events.values_list("action", flat=True))
    assert actions == {
        "login",
        "login.failed",
        "api_token.create",
        "api_token.revoke",
        "project.create",
        "invitation.create",
        "invitation.revoke",
        "invitation.accept",
        "membership.role_change",
        "membership.remove",
        "membership.leave",
        "ownership.transfer",
    }
    # Mallory's failed login belongs to another team's member: not in Acme's log.
    assert not events.filter(target="mallory").exists()
    page = client.get(reverse("team_audit", args=[cast.acme.id])).content.decode()
    assert "ownership.transfer" in page and "127.0.0.1" in page and "member → viewer" in page


def test_audit_log_paginates(client, cast):
    for i in range(60):
        services.audit_record(actor=cast.alice, team=cast.acme, action="project.create", target=i)
    client.force_login(cast.alice)
    url = reverse("team_audit", args=[cast.acme.id])
    assert len(client.get(url).context["page"].object_list) == 50
    assert len(client.get(url, {"page": 2}).context["page"].object_list) == 10


def test_nav_links_to_team_and_tokens(client, cast):
    client.force_login(cast.bob)
    page = client.get(reverse("runs")).content.decode()
    assert f'href="{reverse("teams")}"' in page and f'href="{reverse("api_tokens")}"' in page


def test_the_team_page_offers_leave_to_everyone_but_the_last_owner(client, cast):
    client.force_login(cast.alice)
    page = client.get(reverse("team_detail", args=[cast.acme.id])).content.decode()
    assert "Leave team" not in page and "last owner" in page
    client.force_login(cast.bob)
    page = client.get(reverse("team_detail", args=[cast.acme.id])).content.decode()
    assert "Leave team" in page
