"""Writes of the model registry: names, versions, aliases. Each checks the role first
(Action.REGISTER: members, admins, owners; deleting a version: Action.DELETE), and every
change is written to the team's audit log with the registered model's id in its detail, so
the registered model's page shows its own trail.

A version is a reference to a run's stored adapter, never a copy: registering reads nothing
but the rows and, for an adapter small enough, its bytes once to refuse a damaged one.
"""

import re

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F

from webapp.accounts.models import Team
from webapp.accounts.permissions import Action, require
from webapp.accounts.services import audit_record
from webapp.adapter_registry.models import ModelAlias, ModelVersion, RegisteredModel
from webapp.adapter_registry.selectors import VERSION_REF
from webapp.experiments.artifacts import latest_version
from webapp.experiments.models import ArtifactKind, Run, RunStatus
from webapp.experiments.pages import adapter_files, damage_before_sending

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")
NAME_RULE = "lower-case letters, digits, '.', '_' and '-', starting with a letter or digit"
ALIAS = re.compile(r"[a-z0-9][a-z0-9_-]{0,49}")
ALIAS_RULE = "lower-case letters, digits, '_' and '-' (at most 50), not v<number>"


def registered_create(
    *, user, team: Team, name: str, description: str = "", ip: str | None = None
) -> RegisteredModel:
    """A new, empty registered model of `team`."""
    require(user=user, team=team, action=Action.REGISTER)
    name = name.strip()
    if not NAME.fullmatch(name):
        raise ValidationError(f"Name the registered model with {NAME_RULE} (at most 100).")
    try:
        with transaction.atomic():
            registered = RegisteredModel.objects.create(
                team=team, name=name, description=description.strip()[:2000], created_by=user
            )
    except IntegrityError:
        raise ValidationError(f"{team.name} already has a registered model named {name}.") from None
    _audit(user, registered, "registry.create", ip=ip)
    return registered


def version_create(
    *,
    user,
    registered: RegisteredModel,
    run: Run,
    adapter_version: int | None = None,
    description: str = "",
    ip: str | None = None,
) -> ModelVersion:
    """The next version of `registered`: `run`'s adapter of `adapter_version` (its newest when
    None). Refused with the reason when the run is another team's, not finished, has no such
    adapter, the adapter is damaged, or this very adapter is already a version of the name."""
    require(user=user, team=registered.team, action=Action.REGISTER)
    if run.project.team_id != registered.team_id:
        raise ValidationError(
            f"Run {run.id} belongs to {run.project.team.name}; register it under a name of "
            f"that team ({registered.name} is {registered.team.name}'s)."
        )
    problem = registrable_problem(run)
    if problem:
        raise ValidationError(problem)
    if adapter_version is None:
        adapter_version = latest_version(run_id=run.id, kind=ArtifactKind.ADAPTER)
    files = adapter_files(run, version=adapter_version) if adapter_version else []
    if not files:
        what = "no adapter" if adapter_version is None else f"no adapter version {adapter_version}"
        raise ValidationError(f"Run {run.id} has {what} to register.")
    problem = damage_before_sending(files)
    if problem:
        raise ValidationError(problem)
    with transaction.atomic():
        locked = RegisteredModel.objects.select_for_update().get(id=registered.id)
        same = locked.versions.filter(run=run, adapter_version=adapter_version).first()
        if same is not None:
            raise ValidationError(
                f"Run {run.id}'s adapter version {adapter_version} is already "
                f"{registered.name} v{same.number}."
            )
        RegisteredModel.objects.filter(id=locked.id).update(last_number=F("last_number") + 1)
        version = ModelVersion.objects.create(
            registered=locked,
            number=locked.last_number + 1,
            run=run,
            adapter_version=adapter_version,
            description=description.strip()[:2000],
            created_by=user,
        )
    _audit(
        user,
        registered,
        "registry.version_create",
        target=f"{registered.name} v{version.number}",
        detail={"version": version.number, "run": run.id, "adapter_version": adapter_version},
        ip=ip,
    )
    return version


def registrable_problem(run: Run) -> str:
    """Why the run's adapter cannot be registered yet ("" when it can). A launched run's
    adapter is complete once the run succeeded; a run trained elsewhere (an uploaded adapter,
    an SDK run) once nothing writes to it any more."""
    if run.status == RunStatus.SUCCEEDED or (run.external and run.status != RunStatus.RUNNING):
        return ""
    if run.external:
        return f"Run {run.id} is still running: finish it before registering its adapter."
    return f"Run {run.id} is {run.status}: only a succeeded run's adapter can be registered."


def run_register(
    *,
    user,
    run: Run,
    name: str,
    adapter_version: int | None = None,
    description: str = "",
    ip: str | None = None,
) -> ModelVersion:
    """The run page's Register: a version under `name` of the run's team, the name created
    when the team has none so called."""
    team = run.project.team
    require(user=user, team=team, action=Action.REGISTER)
    name = name.strip()
    with transaction.atomic():
        registered = RegisteredModel.objects.filter(team=team, name=name).first()
        if registered is None:
            registered = registered_create(user=user, team=team, name=name, ip=ip)
        return version_create(
            user=user,
            registered=registered,
            run=run,
            adapter_version=adapter_version,
            description=description,
            ip=ip,
        )


def version_delete(*, user, version: ModelVersion, ip: str | None = None) -> None:
    """Drop a version (admins and owners): the run's adapter stays with the run, and the run
    may be deleted once no version points at it. Refused while an alias points here."""
    registered = version.registered
    require(user=user, team=registered.team, action=Action.DELETE)
    with transaction.atomic():
        RegisteredModel.objects.select_for_update().get(id=registered.id)
        aliases = sorted(version.aliases.values_list("name", flat=True))
        if aliases:
            raise ValidationError(
                f"{registered.name} v{version.number} is {', '.join(aliases)}: move or remove "
                f"{'that alias' if len(aliases) == 1 else 'those aliases'} first."
            )
        version.delete()
    _audit(
        user,
        registered,
        "registry.version_delete",
        target=f"{registered.name} v{version.number}",
        detail={"version": version.number, "run": version.run_id},
        ip=ip,
    )


def alias_set(
    *, user, registered: RegisteredModel, name: str, version: ModelVersion, ip: str | None = None
) -> ModelAlias:
    """Point alias `name` at `version` (creating it, or moving it from where it pointed).
    Audited with who, from and to; setting it where it already points changes nothing."""
    require(user=user, team=registered.team, action=Action.REGISTER)
    name = name.strip()
    if not ALIAS.fullmatch(name) or VERSION_REF.fullmatch(name):
        raise ValidationError(f"Name the alias with {ALIAS_RULE}.")
    if version.registered_id != registered.id:
        raise ValidationError(f"That version is not one of {registered.name}'s.")
    with transaction.atomic():
        RegisteredModel.objects.select_for_update().get(id=registered.id)
        alias = ModelAlias.objects.filter(registered=registered, name=name).first()
        before = alias.version.number if alias else None
        if before == version.number:
            return alias
        if alias is None:
            alias = ModelAlias(registered=registered, name=name)
        alias.version, alias.updated_by = version, user
        alias.save()
    _alias_audit(user, registered, "registry.alias_set", name, before, version.number, ip)
    return alias


def alias_delete(
    *, user, registered: RegisteredModel, alias: ModelAlias, ip: str | None = None
) -> None:
    require(user=user, team=registered.team, action=Action.REGISTER)
    with transaction.atomic():
        RegisteredModel.objects.select_for_update().get(id=registered.id)
        before = alias.version.number
        alias.delete()
    _alias_audit(user, registered, "registry.alias_delete", alias.name, before, None, ip)


def _alias_audit(user, registered, action, name, before, after, ip) -> None:
    detail = {"alias": name, "from": before, "to": after}
    _audit(user, registered, action, target=f"{registered.name}@{name}", detail=detail, ip=ip)


def _audit(
    user, registered, action: str, *, target: str = "", detail: dict | None = None, ip=None
) -> None:
    audit_record(
        actor=user,
        team=registered.team,
        action=action,
        target=target or registered.name,
        detail={"registered": registered.id, **(detail or {})},
        ip=ip,
    )
