"""Writes about people: the audit log, API tokens, logins, teams, invitations and memberships.

Each write that changes a team checks the role matrix (`permissions.require`) and leaves an
audit event.
"""

from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.http import Http404
from django.utils import timezone

from webapp.accounts.models import ApiToken, AuditEvent, Invitation, Membership, Role, Team
from webapp.accounts.permissions import ROLE_ACTIONS, Action, require
from webapp.accounts.secrets import secret_digest, secret_new

API_TOKEN_PREFIX = "plt"


def audit_record(
    *,
    actor,
    action: str,
    team: Team | None = None,
    target: str = "",
    detail: dict | None = None,
    ip: str | None = None,
) -> AuditEvent:
    return AuditEvent.objects.create(
        team=team,
        actor=actor if getattr(actor, "is_authenticated", False) else None,
        action=action,
        target=str(target)[:200],
        detail=detail or {},
        ip=ip or None,
    )


def api_token_create(*, user, name: str, ip: str | None = None) -> tuple[ApiToken, str]:
    """A new token and its secret, which is shown this once and never stored."""
    plain, digest = secret_new(API_TOKEN_PREFIX)
    token = ApiToken.objects.create(
        user=user, name=name.strip()[:100] or "token", prefix=plain[:12], digest=digest
    )
    audit_record(actor=user, action="api_token.create", target=str(token), ip=ip)
    return token, plain


def api_token_revoke(*, user, token: ApiToken, ip: str | None = None) -> None:
    """Revoke one of the user's own tokens (a token of someone else is the caller's 404)."""
    if token.user_id != user.id:
        raise ApiToken.DoesNotExist
    if token.revoked_at is None:
        ApiToken.objects.filter(id=token.id).update(revoked_at=timezone.now())
        audit_record(actor=user, action="api_token.revoke", target=str(token), ip=ip)


def api_token_authenticate(*, plain: str) -> ApiToken | None:
    """The live token with this secret (its user loaded), or None; notes when it was used."""
    if not plain.startswith(f"{API_TOKEN_PREFIX}_") or len(plain) > 100:
        return None
    token = (
        ApiToken.objects.select_related("user")
        .filter(digest=secret_digest(plain), revoked_at__isnull=True, user__is_active=True)
        .first()
    )
    if token is None:
        return None
    now = timezone.now()
    stale = now - timedelta(seconds=settings.API_TOKEN_TOUCH_SECONDS)
    if token.last_used_at is None or token.last_used_at < stale:
        ApiToken.objects.filter(id=token.id).update(last_used_at=now)
        token.last_used_at = now
    return token


# ---- login ------------------------------------------------------------------------------------


def login_record(*, user, ip: str | None = None) -> None:
    audit_record(actor=user, action="login", target=user.get_username(), ip=ip)


def login_failure_record(*, username: str, ip: str | None = None) -> None:
    """A refused password. The username is whatever was typed: kept short, never trusted."""
    username = username[:150]
    audit_record(
        actor=None, action="login.failed", target=username, detail={"username": username}, ip=ip
    )


# ---- teams and projects -----------------------------------------------------------------------


def team_create(*, user, name: str, ip: str | None = None) -> Team:
    """A new team owned by its creator, with a "Default" project to launch runs into."""
    from webapp.experiments.models import Project  # experiments imports this module

    name = name.strip()
    if not name or len(name) > 100:
        raise ValidationError("A team name has 1 to 100 characters.")
    taken = ValidationError("A team with this name exists; pick another name.")
    if Team.objects.filter(name__iexact=name).exists():
        raise taken
    try:
        with transaction.atomic():
            team = Team.objects.create(name=name)
            Membership.objects.create(team=team, user=user, role=Role.OWNER)
            Project.objects.create(team=team, name="Default")
    except IntegrityError:  # the same name, created a moment ago by someone else
        raise taken from None
    audit_record(actor=user, team=team, action="team.create", target=team.name, ip=ip)
    return team


def project_create(*, user, team: Team, name: str, ip: str | None = None):
    """Projects group a team's runs; creating one is team administration (admin and owner)."""
    from webapp.experiments.models import Project

    require(user=user, team=team, action=Action.MANAGE_MEMBERS)
    name = name.strip()
    if not name or len(name) > 100:
        raise ValidationError("A project name has 1 to 100 characters.")
    if Project.objects.filter(team=team, name__iexact=name).exists():
        raise ValidationError("The team has a project with this name.")
    project = Project.objects.create(team=team, name=name)
    audit_record(actor=user, team=team, action="project.create", target=name, ip=ip)
    return project


# ---- invitations ------------------------------------------------------------------------------

INVITATION_PREFIX = "pli"
INVITABLE_ROLES = (Role.ADMIN, Role.MEMBER, Role.VIEWER)  # ownership is transferred, not given


def invitation_create(
    *, user, team: Team, role: str, ip: str | None = None
) -> tuple[Invitation, str]:
    """A one-use link and its secret (shown once) that adds its taker to the team as `role`."""
    require(user=user, team=team, action=Action.MANAGE_MEMBERS)
    if role not in INVITABLE_ROLES:
        raise ValidationError("Invite as admin, member or viewer; ownership is transferred.")
    plain, digest = secret_new(INVITATION_PREFIX)
    invitation = Invitation.objects.create(
        team=team,
        role=role,
        digest=digest,
        created_by=user,
        expires_at=timezone.now() + timedelta(days=settings.INVITATION_DAYS),
    )
    audit_record(
        actor=user,
        team=team,
        action="invitation.create",
        target=f"invitation {invitation.id}",
        detail={"role": role},
        ip=ip,
    )
    return invitation, plain


def invitation_revoke(*, user, invitation: Invitation, ip: str | None = None) -> None:
    require(user=user, team=invitation.team, action=Action.MANAGE_MEMBERS)
    pending = Invitation.objects.filter(
        id=invitation.id, revoked_at__isnull=True, accepted_at__isnull=True
    )
    if pending.update(revoked_at=timezone.now()):
        audit_record(
            actor=user,
            team=invitation.team,
            action="invitation.revoke",
            target=f"invitation {invitation.id}",
            ip=ip,
        )


@transaction.atomic
def invitation_accept(*, user, invitation: Invitation, ip: str | None = None) -> Membership:
    """Join the team with the invitation's role. One use: a conditional UPDATE claims it."""
    if Membership.objects.filter(team=invitation.team, user=user).exists():
        raise ValidationError(f"You are already a member of {invitation.team}.")
    now = timezone.now()
    claimed = Invitation.objects.filter(
        id=invitation.id, accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=now
    ).update(accepted_at=now, accepted_by=user)
    if claimed != 1:
        raise Http404("Not found")
    membership = Membership.objects.create(team=invitation.team, user=user, role=invitation.role)
    audit_record(
        actor=user,
        team=invitation.team,
        action="invitation.accept",
        target=user.get_username(),
        detail={"role": invitation.role, "invitation": invitation.id},
        ip=ip,
    )
    return membership


@transaction.atomic
def invitation_accept_signup(
    *, username: str, password: str, invitation: Invitation, ip: str | None = None
):
    """A new account that joins through the invitation; nothing is kept if the join fails."""
    user = get_user_model().objects.create_user(username=username, password=password)
    invitation_accept(user=user, invitation=invitation, ip=ip)
    return user


# ---- memberships ------------------------------------------------------------------------------


def member_manageable(*, actor_role: str | None, target_role: str) -> bool:
    """Admins manage everyone below owner; owners manage everyone."""
    if actor_role is None or Action.MANAGE_MEMBERS not in ROLE_ACTIONS[actor_role]:
        return False
    return target_role != Role.OWNER or actor_role == Role.OWNER


def _refuse_unless_manageable(*, user, membership: Membership) -> str:
    actor_role = require(user=user, team=membership.team, action=Action.MANAGE_MEMBERS)
    if not member_manageable(actor_role=actor_role, target_role=membership.role):
        raise PermissionDenied("Only an owner can change or remove an owner.")
    return actor_role


def _refuse_last_owner(membership: Membership) -> None:
    """Call inside a transaction: the owners' rows stay locked until it ends, so two owners
    demoting each other at once cannot leave the team without one."""
    if membership.role != Role.OWNER:
        return
    owners = Membership.objects.filter(team=membership.team_id, role=Role.OWNER)
    if len(owners.select_for_update()) <= 1:
        raise ValidationError("A team keeps at least one owner: make someone else owner first.")


@transaction.atomic
def membership_role_change(
    *, user, membership: Membership, role: str, ip: str | None = None
) -> Membership:
    actor_role = _refuse_unless_manageable(user=user, membership=membership)
    if role not in Role.values:
        raise ValidationError("Pick owner, admin, member or viewer.")
    if role == Role.OWNER and actor_role != Role.OWNER:
        raise PermissionDenied("Only an owner can give the owner role.")
    if role == membership.role:
        return membership
    if role != Role.OWNER:
        _refuse_last_owner(membership)
    old = membership.role
    Membership.objects.filter(id=membership.id).update(role=role)
    membership.role = role
    audit_record(
        actor=user,
        team=membership.team,
        action="membership.role_change",
        target=membership.user.get_username(),
        detail={"from": old, "to": role},
        ip=ip,
    )
    return membership


@transaction.atomic
def membership_remove(*, user, membership: Membership, ip: str | None = None) -> None:
    """Admins remove members below owner (owners remove anyone); anyone may leave."""
    leaving = membership.user_id == user.id
    if not leaving:
        _refuse_unless_manageable(user=user, membership=membership)
    _refuse_last_owner(membership)
    team, username = membership.team, membership.user.get_username()
    membership.delete()
    audit_record(
        actor=user,
        team=team,
        action="membership.leave" if leaving else "membership.remove",
        target=username,
        detail={"role": membership.role},
        ip=ip,
    )


@transaction.atomic
def ownership_transfer(
    *, user, team: Team, new_owner_membership: Membership, ip: str | None = None
) -> None:
    """The chosen member becomes owner; the owner who hands over stays on as admin."""
    require(user=user, team=team, action=Action.TRANSFER)
    target = new_owner_membership
    if target.team_id != team.id:
        raise ValidationError("Ownership goes to a member of this team.")
    if target.user_id == user.id or target.role == Role.OWNER:
        raise ValidationError(f"{target.user} owns this team already.")
    Membership.objects.filter(id=target.id).update(role=Role.OWNER)
    Membership.objects.filter(team=team, user=user).update(role=Role.ADMIN)
    audit_record(
        actor=user,
        team=team,
        action="ownership.transfer",
        target=target.user.get_username(),
        detail={"previous_role": target.role},
        ip=ip,
    )
