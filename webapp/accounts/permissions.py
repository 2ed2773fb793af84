"""The role matrix, in one place (docs/PERMISSIONS.md is its readable copy).

A service asks `require(user=…, team=…, action=…)` before it writes. Reads of team data need
only a membership, which the `*_for_user` selectors enforce (another team's id gives 404).
"""

from enum import StrEnum

from django.core.exceptions import PermissionDenied

from webapp.accounts.models import Membership, Role, Team


class Action(StrEnum):
    READ = "read"  # see runs, sweeps, datasets, metrics; download adapters
    LAUNCH = "launch"  # launch and cancel runs and sweeps, upload datasets
    ANNOTATE = "annotate"  # comment, tag, edit notes
    SHARE = "share"  # create read-only share links; revoke one's own
    DELETE = "delete"  # delete runs, sweeps, datasets, others' comments; revoke any link
    MANAGE_MEMBERS = "manage_members"  # invite, change roles below owner, remove; audit log;
    # create projects
    TRANSFER = "transfer"  # make someone else owner; rename or delete the team
    MODELS = "models"  # register the team's own base models
    REGISTER = "register"  # register adapters in the model registry, move its aliases


_VIEWER = {Action.READ}
_MEMBER = _VIEWER | {Action.LAUNCH, Action.ANNOTATE, Action.SHARE, Action.REGISTER}
_ADMIN = _MEMBER | {Action.DELETE, Action.MANAGE_MEMBERS, Action.MODELS}
_OWNER = _ADMIN | {Action.TRANSFER}

ROLE_ACTIONS: dict[str, frozenset[Action]] = {
    Role.VIEWER: frozenset(_VIEWER),
    Role.MEMBER: frozenset(_MEMBER),
    Role.ADMIN: frozenset(_ADMIN),
    Role.OWNER: frozenset(_OWNER),
}

DENIED_MESSAGE = {
    Action.READ: "You are not a member of this team.",
    Action.LAUNCH: "Viewers cannot launch, cancel or upload; ask a team admin for the member role.",
    Action.ANNOTATE: "Viewers cannot comment, tag or edit notes.",
    Action.SHARE: "Viewers cannot create share links.",
    Action.DELETE: "Only a team admin or owner can delete.",
    Action.MANAGE_MEMBERS: "Only a team admin or owner can manage members.",
    Action.TRANSFER: "Only the team's owner can do this.",
    Action.MODELS: "Only a team admin or owner can register models.",
    Action.REGISTER: "Viewers cannot register adapters or move aliases in the model registry; "
    "ask a team admin for the member role.",
}

# Roles ordered by power: an admin may grant or change roles strictly below owner.
ROLE_RANK = {Role.VIEWER: 0, Role.MEMBER: 1, Role.ADMIN: 2, Role.OWNER: 3}


def role_of(*, user, team: Team) -> str | None:
    if not getattr(user, "is_authenticated", False):
        return None
    return Membership.objects.filter(user=user, team=team).values_list("role", flat=True).first()


def can(*, user, team: Team, action: Action) -> bool:
    role = role_of(user=user, team=team)
    return role is not None and action in ROLE_ACTIONS[role]


def require(*, user, team: Team, action: Action) -> str:
    """The user's role in the team, or PermissionDenied naming what the role lacks."""
    role = role_of(user=user, team=team)
    if role is None or action not in ROLE_ACTIONS[role]:
        raise PermissionDenied(DENIED_MESSAGE[action])
    return role
