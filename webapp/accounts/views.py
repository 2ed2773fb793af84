"""Team, invitation, API-token and audit-log pages, and the audited login.

Thin: selectors read, services write and check the role matrix. A secret (invitation link,
API token) is rendered on the response that created it and never again.
"""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model, login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import AuthenticationForm, UserCreationForm
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.cache import add_never_cache_headers
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from webapp.accounts import selectors, services
from webapp.accounts.forms import ApiTokenForm, InvitationForm, ProjectForm, RoleForm, TeamForm
from webapp.accounts.models import Role
from webapp.accounts.permissions import ROLE_ACTIONS, ROLE_RANK, Action, role_of
from webapp.experiments.selectors import project_list_for_user
from webapp.http import client_ip, error_text

AUDIT_PAGE_SIZE = 50
LOCKED_OUT = "Too many failed logins from your address (for this username, or for many)."


class AuditedLoginView(auth_views.LoginView):
    """Django's login page; every success and every refused password leaves an audit event."""

    def form_valid(self, form):
        response = super().form_valid(form)
        services.login_record(user=form.get_user(), ip=client_ip(self.request))
        return response

    def form_invalid(self, form):
        username = self.request.POST.get("username", "")
        services.login_failure_record(username=username, ip=client_ip(self.request))
        return super().form_invalid(form)


def login_cooloff_seconds() -> int:
    return int(settings.AXES_COOLOFF_TIME.total_seconds())


def login_attempt_username(request, credentials=None) -> str:
    """The username django-axes counts failures under, cut to what a username can be: axes
    stores it in a 255-character column, and a longer one must not turn a login into a 500."""
    if credentials:
        name = credentials.get("username")
    else:
        name = request.POST.get("username")
    return str(name or "")[: get_user_model().username.field.max_length]


def login_locked_out(request, original_response=None, credentials=None):
    """django-axes answers a locked-out username and address with this: the login page, 429.

    The refused attempt was already audited by AuditedLoginView.form_invalid.
    """
    context = {
        "form": AuthenticationForm(request),
        "next": request.POST.get("next", ""),
        "locked_out": LOCKED_OUT,
        "cooloff_minutes": max(1, login_cooloff_seconds() // 60),
    }
    response = render(request, "registration/login.html", context, status=429)
    response["Retry-After"] = str(login_cooloff_seconds())
    return response


# ---- teams --------------------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def team_list(request):
    form = TeamForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            team = services.team_create(
                user=request.user, name=form.cleaned_data["name"], ip=client_ip(request)
            )
        except ValidationError as exc:
            form.add_error("name", exc)
        else:
            messages.success(request, f"Team “{team.name}” created, with a Default project.")
            return redirect("team_detail", team_id=team.id)
    context = {"form": form, "memberships": selectors.membership_list_for_user(user=request.user)}
    return render(request, "accounts/team_list.html", context, status=400 if form.errors else 200)


@login_required
@require_GET
def team_detail(request, team_id: int):
    team = selectors.team_get_for_user(user=request.user, team_id=team_id)
    return _team_page(request, team)


def _team_page(request, team, *, invite_form=None, invite_url: str = "", status: int = 200):
    role = role_of(user=request.user, team=team)
    allowed = ROLE_ACTIONS[role]
    members = selectors.membership_list_for_team(team=team)
    context = {
        "team": team,
        "my_role": role,
        "role_can": {action.value: action in allowed for action in Action},
        "rows": [
            (m, services.member_manageable(actor_role=role, target_role=m.role)) for m in members
        ],
        "grantable_roles": [
            (value, label) for value, label in Role.choices if _grants(role, value)
        ],
        "projects": project_list_for_user(user=request.user).filter(team=team),
        "project_form": ProjectForm(),
        "invitations": selectors.invitation_list_for_team(team=team),
        "invite_form": invite_form or InvitationForm(),
        "invite_url": invite_url,
        "invitation_days": settings.INVITATION_DAYS,
        # The last owner cannot leave (the service refuses); the page does not offer it.
        "can_leave": role != Role.OWNER or sum(m.role == Role.OWNER for m in members) > 1,
    }
    response = render(request, "accounts/team_detail.html", context, status=status)
    if invite_url:
        add_never_cache_headers(response)
    return response


def _grants(actor_role: str, role: str) -> bool:
    """Owners give any role; admins give roles below owner."""
    return actor_role == Role.OWNER or ROLE_RANK[role] < ROLE_RANK[Role.OWNER]


@login_required
@require_POST
def project_create(request, team_id: int):
    team = selectors.team_get_for_user(user=request.user, team_id=team_id)
    form = ProjectForm(request.POST)
    if not form.is_valid():
        messages.error(request, "A project name has 1 to 100 characters.")
        return redirect("team_detail", team_id=team.id)
    try:
        project = services.project_create(
            user=request.user, team=team, name=form.cleaned_data["name"], ip=client_ip(request)
        )
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
    else:
        messages.success(request, f"Project “{project.name}” created.")
    return redirect("team_detail", team_id=team.id)


@login_required
@require_GET
def team_audit(request, team_id: int):
    team = selectors.team_get_for_user(user=request.user, team_id=team_id)
    try:
        events = selectors.audit_list_for_team(user=request.user, team=team)
    except PermissionDenied as exc:
        context = {"team": team, "message": error_text(exc)}
        return render(request, "accounts/forbidden.html", context, status=403)
    page = Paginator(events, AUDIT_PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "accounts/team_audit.html", {"team": team, "page": page})


# ---- invitations --------------------------------------------------------------------------


@login_required
@require_POST
def team_invite(request, team_id: int):
    team = selectors.team_get_for_user(user=request.user, team_id=team_id)
    form = InvitationForm(request.POST)
    if not form.is_valid():
        return _team_page(request, team, invite_form=form, status=400)
    try:
        _, secret = services.invitation_create(
            user=request.user, team=team, role=form.cleaned_data["role"], ip=client_ip(request)
        )
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
        return redirect("team_detail", team_id=team.id)
    url = request.build_absolute_uri(reverse("invitation_accept", args=[secret]))
    return _team_page(request, team, invite_url=url)


@login_required
@require_POST
def invitation_revoke(request, invitation_id: int):
    invitation = selectors.invitation_get_for_user(user=request.user, invitation_id=invitation_id)
    try:
        services.invitation_revoke(user=request.user, invitation=invitation, ip=client_ip(request))
    except PermissionDenied as exc:
        messages.error(request, error_text(exc))
    else:
        messages.info(request, "Invitation revoked: its link now answers 404.")
    return redirect("team_detail", team_id=invitation.team_id)


@never_cache
@require_http_methods(["GET", "POST"])
def invitation_accept(request, secret: str):
    """Open to anyone holding the link: a member joins, a visitor signs up and joins."""
    invitation = selectors.invitation_resolve(secret=secret)
    if request.user.is_authenticated:
        return _accept_as_user(request, invitation)
    return _accept_with_signup(request, invitation)


def _accept_as_user(request, invitation):
    if request.method == "POST":
        try:
            services.invitation_accept(
                user=request.user, invitation=invitation, ip=client_ip(request)
            )
        except ValidationError as exc:
            messages.error(request, error_text(exc))
        else:
            messages.success(request, f"Welcome to {invitation.team}.")
        return redirect("team_detail", team_id=invitation.team_id)
    context = {
        "invitation": invitation,
        "member": role_of(user=request.user, team=invitation.team) is not None,
    }
    return render(request, "accounts/invitation_accept.html", context)


def _accept_with_signup(request, invitation):
    form = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = services.invitation_accept_signup(
            username=form.cleaned_data["username"],
            password=form.cleaned_data["password1"],
            invitation=invitation,
            ip=client_ip(request),
        )
        # Just created, no password checked: the session belongs to the model backend.
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        services.login_record(user=user, ip=client_ip(request))
        messages.success(request, f"Welcome to {invitation.team}, {user.get_username()}.")
        return redirect("runs")
    context = {"invitation": invitation, "form": form}
    status = 400 if form.errors else 200
    return render(request, "accounts/invitation_accept.html", context, status=status)


# ---- memberships --------------------------------------------------------------------------


@login_required
@require_POST
def membership_role(request, membership_id: int):
    membership = selectors.membership_get_for_user(user=request.user, membership_id=membership_id)
    form = RoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Pick owner, admin, member or viewer.")
        return redirect("team_detail", team_id=membership.team_id)
    try:
        services.membership_role_change(
            user=request.user,
            membership=membership,
            role=form.cleaned_data["role"],
            ip=client_ip(request),
        )
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
    else:
        messages.success(request, f"{membership.user} is now {membership.get_role_display()}.")
    return redirect("team_detail", team_id=membership.team_id)


@login_required
@require_POST
def membership_remove(request, membership_id: int):
    """Remove someone, or leave the team when the membership is one's own."""
    membership = selectors.membership_get_for_user(user=request.user, membership_id=membership_id)
    leaving = membership.user_id == request.user.id
    try:
        services.membership_remove(user=request.user, membership=membership, ip=client_ip(request))
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
        return redirect("team_detail", team_id=membership.team_id)
    if leaving:
        messages.info(request, f"You left {membership.team}.")
        return redirect("teams")
    messages.info(request, f"{membership.user} was removed from {membership.team}.")
    return redirect("team_detail", team_id=membership.team_id)


@login_required
@require_POST
def ownership_transfer(request, membership_id: int):
    membership = selectors.membership_get_for_user(user=request.user, membership_id=membership_id)
    try:
        services.ownership_transfer(
            user=request.user,
            team=membership.team,
            new_owner_membership=membership,
            ip=client_ip(request),
        )
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
    else:
        messages.success(request, f"{membership.user} now owns {membership.team}; you are admin.")
    return redirect("team_detail", team_id=membership.team_id)


# ---- API tokens ---------------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def api_tokens(request):
    form = ApiTokenForm(request.POST or None)
    secret = ""
    if request.method == "POST" and form.is_valid():
        _, secret = services.api_token_create(
            user=request.user, name=form.cleaned_data["name"], ip=client_ip(request)
        )
        form = ApiTokenForm()
    context = {
        "form": form,
        "tokens": selectors.api_token_list_for_user(user=request.user),
        "secret": secret,
        "site": request.build_absolute_uri("/").rstrip("/"),
    }
    response = render(
        request, "accounts/api_tokens.html", context, status=400 if form.errors else 200
    )
    add_never_cache_headers(response)
    return response


@login_required
@require_POST
def api_token_revoke(request, token_id: int):
    token = selectors.api_token_get_for_user(user=request.user, token_id=token_id)
    services.api_token_revoke(user=request.user, token=token, ip=client_ip(request))
    messages.info(request, f"Token “{token.name}” revoked: it no longer authenticates.")
    return redirect("api_tokens")
