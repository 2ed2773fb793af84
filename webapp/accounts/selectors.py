"""Reads about people: teams, memberships, invitations, API tokens, the audit log.

Like every selector of team data, these answer 404 for another team's ids, so that a
stranger cannot even learn that an id exists.
"""

from django.db.models import Case, Count, IntegerField, Q, QuerySet, Value, When
from django.http import Http404
from django.utils import timezone

from webapp.accounts.models import ApiToken, AuditEvent, Invitation, Membership, Team
from webapp.accounts.permissions import ROLE_RANK, Action, require
from webapp.accounts.secrets import secret_digest

# Events without a team that a team's admins see for the team's current members.
PERSONAL_AUDIT_ACTIONS = ("login", "login.failed", "api_token.create", "api_token.revoke")


def team_get_for_user(*, user, team_id: int) -> Team:
    return _get_or_404(Team.objects.filter(memberships__user=user), team_id)


def membership_list_for_user(*, user) -> QuerySet[Membership]:
    """The user's own memberships, each with its team's member count."""
    return (
        Membership.objects.filter(user=user)
        .select_related("team")
        .annotate(member_count=Count("team__memberships"))
        .order_by("team__name")
    )


def membership_list_for_team(*, team: Team) -> QuerySet[Membership]:
    """Owners first, then admins, members and viewers; by username within a role."""
    rank = Case(
        *(When(role=role, then=Value(-r)) for role, r in ROLE_RANK.items()),
        output_field=IntegerField(),
    )
    return (
        Membership.objects.filter(team=team).select_related("user").order_by(rank, "user__username")
    )


def membership_get_for_user(*, user, membership_id: int) -> Membership:
    """Any membership of the user's teams (what may be done with it is the services' call)."""
    memberships = Membership.objects.filter(team__memberships__user=user)
    return _get_or_404(memberships.select_related("team", "user"), membership_id)


def invitation_list_for_team(*, team: Team) -> QuerySet[Invitation]:
    """The invitations that can still be taken: not accepted, not revoked, not expired."""
    return Invitation.objects.filter(
        team=team, accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=timezone.now()
    ).select_related("created_by")


def invitation_get_for_user(*, user, invitation_id: int) -> Invitation:
    invitations = Invitation.objects.filter(team__memberships__user=user)
    return _get_or_404(invitations.select_related("team"), invitation_id)


def invitation_resolve(*, secret: str) -> Invitation:
    """The live invitation with this secret; unknown, used, revoked and expired are all 404."""
    invitation = (
        Invitation.objects.select_related("team")
        .filter(
            digest=secret_digest(secret[:100]),
            accepted_at__isnull=True,
            revoked_at__isnull=True,
            expires_at__gt=timezone.now(),
        )
        .first()
    )
    if invitation is None:
        raise Http404("Not found")
    return invitation


def api_token_list_for_user(*, user) -> QuerySet[ApiToken]:
    return ApiToken.objects.filter(user=user)


def api_token_get_for_user(*, user, token_id: int) -> ApiToken:
    return _get_or_404(api_token_list_for_user(user=user), token_id)


def audit_list_for_team(*, user, team: Team) -> QuerySet[AuditEvent]:
    """The team's events, plus the logins and token changes of its current members.

    Admins and owners only: PermissionDenied for the team's members and viewers (the caller
    has already turned a stranger's team id into 404 with `team_get_for_user`).
    """
    require(user=user, team=team, action=Action.MANAGE_MEMBERS)
    members = Membership.objects.filter(team=team)
    personal = Q(team__isnull=True, action__in=PERSONAL_AUDIT_ACTIONS) & (
        Q(actor__in=members.values("user_id"))
        | Q(action="login.failed", target__in=members.values("user__username"))
    )
    return AuditEvent.objects.filter(Q(team=team) | personal).select_related("actor")


def _get_or_404(queryset: QuerySet, pk: int):
    obj = queryset.filter(pk=pk).first()
    if obj is None:
        raise Http404("Not found")
    return obj
