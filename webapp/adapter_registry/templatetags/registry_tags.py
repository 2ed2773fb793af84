"""The run page's Model registry panel, rendered by this app so that the experiments code
never imports the registry: `{% load registry_tags %}{% registry_panel run %}`."""

from django import template

from webapp.accounts.permissions import Action, can
from webapp.adapter_registry import selectors
from webapp.adapter_registry.services import registrable_problem
from webapp.experiments.artifacts import latest_version
from webapp.experiments.models import ArtifactKind

register = template.Library()


@register.inclusion_tag("adapter_registry/_run_panel.html", takes_context=True)
def registry_panel(context, run) -> dict:
    user = context["user"]
    return {
        "run": run,
        "csrf_token": context.get("csrf_token"),
        "registered_versions": selectors.versions_of_run(run=run),
        "names": selectors.names_for_run(run=run),
        "can_register": can(user=user, team=run.project.team, action=Action.REGISTER),
        "adapter_version": latest_version(run_id=run.id, kind=ArtifactKind.ADAPTER),
        "problem": registrable_problem(run),
    }
