"""Team, membership, invitation, API-token and audit-log pages."""

from django.urls import path

from webapp.accounts import views

urlpatterns = [
    path("teams/", views.team_list, name="teams"),
    path("teams/<int:team_id>/", views.team_detail, name="team_detail"),
    path("teams/<int:team_id>/invite/", views.team_invite, name="team_invite"),
    path("teams/<int:team_id>/projects/", views.project_create, name="project_create"),
    path("teams/<int:team_id>/audit/", views.team_audit, name="team_audit"),
    path(
        "invitations/<int:invitation_id>/revoke/",
        views.invitation_revoke,
        name="invitation_revoke",
    ),
    path("memberships/<int:membership_id>/role/", views.membership_role, name="membership_role"),
    path(
        "memberships/<int:membership_id>/remove/",
        views.membership_remove,
        name="membership_remove",
    ),
    path(
        "memberships/<int:membership_id>/make-owner/",
        views.ownership_transfer,
        name="ownership_transfer",
    ),
    path("settings/tokens/", views.api_tokens, name="api_tokens"),
    path("settings/tokens/<int:token_id>/revoke/", views.api_token_revoke, name="api_token_revoke"),
    # Open without login: the secret is the key. Unknown, used, revoked or expired: 404.
    path("invite/<str:secret>/", views.invitation_accept, name="invitation_accept"),
]
