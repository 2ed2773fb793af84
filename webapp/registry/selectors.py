"""Reads of the model registry: the bundled rows (no team) and a member's teams' own.

Another team's model is 404, as everything of another team is.
"""

from pathlib import Path

from django.conf import settings
from django.db.models import F, Q, QuerySet
from django.http import Http404

from peft_core.catalogue import CATALOGUE, key_for_name
from webapp.accounts.models import Membership, Team
from webapp.registry.models import BaseModel, ModelSource, ModelStatus


def model_list_for_user(*, user) -> QuerySet[BaseModel]:
    teams = Membership.objects.filter(user=user).values("team_id")
    visible = BaseModel.objects.filter(Q(team=None) | Q(team_id__in=teams)).select_related("team")
    return visible.order_by(F("team__name").asc(nulls_first=True), "name")  # bundled first


def model_get_for_user(*, user, model_id: int) -> BaseModel:
    try:
        return model_list_for_user(user=user).get(id=model_id)
    except BaseModel.DoesNotExist:
        raise Http404("No such model.") from None


def model_named_for_user(*, user, name: str) -> BaseModel | None:
    """The ready model `name` of one of the user's teams, else the bundled one."""
    ready = model_list_for_user(user=user).filter(name=name, status=ModelStatus.READY)
    row = ready.order_by(F("team_id").asc(nulls_last=True)).first()
    return catalogue_row(name) if row is None and name in CATALOGUE else row


def model_for_team(*, team: Team, name: str) -> BaseModel | None:
    """The model `name` means in `team`: the team's own, else a bundled one (a catalogue key
    always resolves, also before its row is written)."""
    row = (
        BaseModel.objects.filter(Q(team=None) | Q(team=team), name=name)
        .order_by("team_id")  # NULLs last: the team's own row first
        .first()
    )
    if row is None and name in CATALOGUE:
        return catalogue_row(name)
    return row


def model_by_reference(*, team: Team, name: str) -> BaseModel | None:
    """The ready model `name` refers to in `team`, as a training script may write it: its
    name (model_for_team), a bundled model's Hub id, or one of the team's models' Hub id
    (also as id@revision) or directory. None when it names none of them."""
    model = model_for_team(team=team, name=name)
    if model is None:
        key = key_for_name(name)
        model = catalogue_row(key) if key else _registered_at(team=team, place=name)
    return model if model is not None and model.is_ready else None


def _registered_at(*, team: Team, place: str) -> BaseModel | None:
    location, _, revision = place.partition("@")
    rows = BaseModel.objects.filter(team=team, status=ModelStatus.READY, location=location)
    rows = rows.exclude(source=ModelSource.CATALOGUE)
    return rows.filter(revision=revision).first() if revision else rows.first()


def catalogue_row(key: str) -> BaseModel:
    """The (unsaved) row of a catalogue entry: what the data migration writes."""
    spec = CATALOGUE[key]
    return BaseModel(
        team=None,
        name=spec.key,
        title=spec.title,
        description=spec.description,
        source=ModelSource.CATALOGUE,
        location=spec.key,
        revision=spec.hub_id,
        status=ModelStatus.READY,
        tasks=list(spec.tasks),
    )


def launch_model_choices(team_ids) -> list[tuple[str, str]]:
    """(name, label) of the bundled models, then the ready models of `team_ids`."""
    choices = {key: spec.title for key, spec in CATALOGUE.items()}
    rows = BaseModel.objects.filter(status=ModelStatus.READY, team_id__in=list(team_ids))
    for row in rows.select_related("team").order_by("name"):
        choices.setdefault(row.name, f"{row.title or row.name} ({row.team.name})")
    return list(choices.items())


def model_directory(model: BaseModel) -> Path | None:
    """A registered model's directory, without the network: the local one, or the Hub
    snapshot of its resolved commit in the shared cache. None for a bundled model."""
    if model.source == ModelSource.LOCAL:
        return Path(model.location)
    if model.source == ModelSource.HUB and model.commit:
        repo = "models--" + model.location.replace("/", "--")
        return Path(settings.HF_HUB_CACHE) / repo / "snapshots" / model.commit
    return None


def upload_models(*, team: Team) -> dict[str, dict]:
    """The team's ready registered models as adapter_check takes them: directory, tasks, the
    names an adapter_config.json may give them (Hub id, directory), what to write back."""
    models = {}
    rows = BaseModel.objects.filter(team=team, status=ModelStatus.READY)
    for row in rows.exclude(source=ModelSource.CATALOGUE):
        directory = model_directory(row)
        if directory is None:
            continue
        models[row.name] = {
            "dir": str(directory),
            "tasks": list(row.tasks),
            "aliases": [row.location, f"{row.location}@{row.revision}"] if row.revision
            else [row.location],
            "upstream": row.location,
            "revision": row.commit or None,
        }  # fmt: skip
    return models
