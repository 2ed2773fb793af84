"""Small bounded forms for the team and token pages; the services re-check everything."""

from django import forms

from webapp.accounts.models import Role
from webapp.accounts.services import INVITABLE_ROLES


class TeamForm(forms.Form):
    name = forms.CharField(max_length=100, label="Team name")


class ProjectForm(forms.Form):
    name = forms.CharField(max_length=100, label="Project name")


class InvitationForm(forms.Form):
    role = forms.ChoiceField(
        choices=[(role.value, role.label) for role in INVITABLE_ROLES],
        initial=Role.MEMBER,
        help_text="Viewers read; members also launch, comment and share; admins also delete "
        "and manage members.",
    )


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)


class ApiTokenForm(forms.Form):
    name = forms.CharField(
        max_length=100,
        label="Token name",
        help_text="Where the token will live, e.g. “laptop” or “CI”.",
    )
