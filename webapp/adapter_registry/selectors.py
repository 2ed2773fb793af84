"""Reads of the model registry. Every query is scoped to the user's teams, so another team's
registered model, version or alias is 404, as everything of another team is.

A registered model is named by its team-scoped name. A reference names one version:
`name@alias` or `name@vN` (aliases may not look like `vN`). Names resolve within the user's
teams; a user in several teams that each have the name must say which (`team`, an id or a
team's name): `RegistryAmbiguous`, a 400 naming the teams.
"""

import math
import re

from django.core.exceptions import ValidationError
from django.db.models import Count, QuerySet
from django.http import Http404

from webapp.accounts.models import AuditEvent, Membership
from webapp.adapter_registry.models import ModelAlias, ModelVersion, RegisteredModel
from webapp.experiments.models import Artifact, ArtifactKind

VERSION_REF = re.compile(r"v([1-9][0-9]{0,8})")
# The audit actions of the registry (services write them), shown on a registered model's page.
AUDIT_ACTIONS = (
    "registry.create",
    "registry.version_create",
    "registry.version_delete",
    "registry.alias_set",
    "registry.alias_delete",
)


class RegistryAmbiguous(ValidationError):
    """A name that several of the user's teams have, asked for without a team."""


def registered_list_for_user(*, user, team: str | None = None) -> QuerySet[RegisteredModel]:
    """The registered models of the user's teams (of one of them with `team`: an id or a
    name), with their version counts."""
    teams = Membership.objects.filter(user=user).values("team_id")
    models = RegisteredModel.objects.filter(team_id__in=teams).select_related("team")
    if team:
        models = models.filter(**_team_lookup(team))
    return models.annotate(version_count=Count("versions")).order_by("name", "team__name")


def _team_lookup(team: str) -> dict:
    team = str(team).strip()
    if team.isdigit() and len(team) < 19:  # within a bigint; a longer one names no team
        return {"team_id": int(team)}
    return {"team__name": team}


def registered_get_for_user(*, user, registered_id: int) -> RegisteredModel:
    try:
        return registered_list_for_user(user=user).get(id=registered_id)
    except RegisteredModel.DoesNotExist:
        raise Http404("No such registered model.") from None


def registered_named_for_user(*, user, name: str, team: str | None = None) -> RegisteredModel:
    """The registered model `name` of the user's teams; 404 when none has it,
    RegistryAmbiguous when several do and `team` does not say which."""
    found = list(registered_list_for_user(user=user, team=team).filter(name=name)[:10])
    if not found:
        raise Http404(f"No registered model named {name} in your teams.")
    if len(found) > 1:
        teams = ", ".join(f"{m.team.name} (id {m.team_id})" for m in found)
        raise RegistryAmbiguous(
            f"Several of your teams have a registered model named {name}: {teams}. "
            "Say which with ?team=<team id or name> (the CLI's --team)."
        )
    return found[0]


def ref_parse(ref: str) -> tuple[str, str | None]:
    """ "name@alias" or "name@v3" → (name, "alias" / "v3"); "name" → (name, None)."""
    name, at, selector = ref.partition("@")
    if at and not selector:
        raise Http404("Name a version after @: name@production or name@v3.")
    return name, selector if at else None


def version_selected(*, registered: RegisteredModel, selector: str) -> ModelVersion:
    """The version `selector` names: "v3" (number 3) or an alias."""
    match = VERSION_REF.fullmatch(selector)
    if match:
        return version_get(registered=registered, number=int(match.group(1)))
    alias = ModelAlias.objects.filter(registered=registered, name=selector).first()
    if alias is None:
        raise Http404(f"{registered.name} has no alias {selector}.")
    return version_get(registered=registered, number=alias.version.number)


def version_get(*, registered: RegisteredModel, number: int) -> ModelVersion:
    version = version_list(registered=registered).filter(number=number).first()
    if version is None:
        raise Http404(f"{registered.name} has no version {number}.")
    return version


def version_list(*, registered: RegisteredModel) -> QuerySet[ModelVersion]:
    related = ("registered__team", "run__project__team", "run__dataset", "created_by")
    return (
        ModelVersion.objects.filter(registered=registered)
        .select_related(*related)
        .prefetch_related("aliases")
        .order_by("-number")
    )


def version_files(version: ModelVersion) -> list[Artifact]:
    """The adapter files the version points at (the run keeps them)."""
    files = Artifact.objects.filter(
        run_id=version.run_id, kind=ArtifactKind.ADAPTER, version=version.adapter_version
    )
    return list(files.order_by("name"))


def versions_with_files(*, registered: RegisteredModel) -> list[ModelVersion]:
    """The versions, newest first, each with `.files` (its Artifact rows) and `.size`, read in
    one query for all of them."""
    versions = list(version_list(registered=registered))
    wanted = {(v.run_id, v.adapter_version) for v in versions}
    rows = Artifact.objects.filter(
        run_id__in={run_id for run_id, _ in wanted}, kind=ArtifactKind.ADAPTER
    ).order_by("name")
    files: dict[tuple[int, int], list[Artifact]] = {}
    for row in rows:
        if (row.run_id, row.version) in wanted:
            files.setdefault((row.run_id, row.version), []).append(row)
    for version in versions:
        version.files = files.get((version.run_id, version.adapter_version), [])
        version.size = sum(f.size for f in version.files)
    return versions


def alias_list(*, registered: RegisteredModel) -> QuerySet[ModelAlias]:
    return registered.aliases.select_related("version", "updated_by").order_by("name")


def alias_get(*, registered: RegisteredModel, name: str) -> ModelAlias:
    alias = alias_list(registered=registered).filter(name=name).first()
    if alias is None:
        raise Http404(f"{registered.name} has no alias {name}.")
    return alias


def registry_history(*, registered: RegisteredModel, limit: int = 200) -> QuerySet[AuditEvent]:
    """The registered model's audit trail, newest first: versions registered and deleted,
    aliases set, moved and removed (who, from, to, when)."""
    events = AuditEvent.objects.filter(
        team=registered.team, action__in=AUDIT_ACTIONS, detail__registered=registered.id
    )
    return events.select_related("actor").order_by("-created_at", "-id")[:limit]


def names_for_run(*, run) -> list[str]:
    """The registered models of the run's team, for the run page's Register form."""
    names = RegisteredModel.objects.filter(team_id=run.project.team_id)
    return list(names.order_by("name").values_list("name", flat=True))


def versions_of_run(*, run) -> QuerySet[ModelVersion]:
    """Where the run's adapters are registered (the run page lists them)."""
    rows = ModelVersion.objects.filter(run=run).select_related("registered")
    return rows.prefetch_related("aliases").order_by("registered__name", "number")


# The run's summary values the registry's pages put first, where the run has them.
KEY_METRICS = ("eval_loss", "eval_accuracy", "eval_exact_match", "base_eval_loss", "train_loss")


def summary_metrics(run) -> dict[str, float]:
    """The run's numeric summary values (what its training reported last), by key."""
    summary = run.summary if isinstance(run.summary, dict) else {}
    return {
        key: value
        for key, value in sorted(summary.items())
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def key_metrics(run, *, at_most: int = 3) -> list[tuple[str, float]]:
    """Up to `at_most` (key, value) for a table cell: KEY_METRICS first, then the others."""
    values = summary_metrics(run)
    ordered = [k for k in KEY_METRICS if k in values] + [k for k in values if k not in KEY_METRICS]
    return [(key, values[key]) for key in ordered[:at_most]]
