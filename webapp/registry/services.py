"""Writes of the model registry: registering a team's model, and the inspection's outcome.

Registration checks what can be checked without a model, in the request: the path lies under
an allowed root with no symlink out, the directory holds a config that needs no code of its
own and safetensors weights, a Hub id resolves in the shared cache when the Hub is off. A
refusal is a ValidationError naming the reason, and nothing is stored or queued. A worker
then inspects the model on the meta device (workers/inspection.py) and marks it ready or
refused.
"""

import re

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from peft_core.catalogue import CATALOGUE
from peft_core.sources import (
    ModelSourceError,
    hub_offline,
    hub_snapshot,
    local_directory,
    model_files,
    parse_hub_ref,
)
from webapp.accounts.models import Team
from webapp.accounts.permissions import Action, require
from webapp.experiments import queue
from webapp.registry.models import BaseModel, ModelSource, ModelStatus

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")
NAME_RULE = "lower-case letters, digits, '.', '_' and '-', starting with a letter or digit"


def model_register(
    *, user, team: Team, name: str, path: str = "", hub: str = "", title: str = ""
) -> BaseModel:
    """A team's model from a directory under an allowed root (`path`) or a Hub id@revision
    (`hub`), queued for inspection; ValidationError, storing nothing, when it is refused."""
    require(user=user, team=team, action=Action.MODELS)
    return model_register_for_team(
        team=team, name=name, path=path, hub=hub, title=title, created_by=user
    )


def model_register_for_team(
    *, team: Team, name: str, path: str = "", hub: str = "", title: str = "", created_by=None
) -> BaseModel:
    """model_register without a member's permission check: for the server's administrator
    (`manage.py model_add`), who decides the roots anyway."""
    name = name.strip()
    _check_name(team, name)
    if bool(path) == bool(hub):
        raise ValidationError("Give either a directory or a Hub id@revision, not both.")
    try:
        fields = _local_fields(path) if path else _hub_fields(hub)
    except ModelSourceError as error:
        raise ValidationError(str(error)) from error
    with transaction.atomic():
        model = BaseModel.objects.create(
            team=team, name=name, title=title.strip()[:200], created_by=created_by, **fields
        )
        queue.enqueue_on_commit(queue.MODEL_INSPECT, model.id)
    return model


def _check_name(team: Team, name: str) -> None:
    if not NAME.fullmatch(name):
        raise ValidationError(f"Name the model with {NAME_RULE} (at most 100).")
    if name in CATALOGUE:
        raise ValidationError(f"{name} is a bundled model's name; choose another.")
    if BaseModel.objects.filter(team=team, name=name).exists():
        raise ValidationError(f"{team.name} already has a model named {name}.")


def _local_fields(path: str) -> dict:
    directory = local_directory(path, settings.MODEL_ROOTS)
    files = model_files(directory)
    return {
        "source": ModelSource.LOCAL,
        "location": str(directory),
        "content_sha256": files.content_sha256,
        "tasks": [],
    }


def _hub_fields(hub: str) -> dict:
    ref = parse_hub_ref(hub)
    fields = {"source": ModelSource.HUB, "location": ref.repo_id, "revision": ref.revision}
    if hub_offline():  # only the cache can answer: answer now, before anything is queued
        snapshot = hub_snapshot(ref, settings.HF_HUB_CACHE, offline=True)
        directory = local_directory(str(snapshot), [settings.HF_HUB_CACHE])
        fields["commit"] = snapshot.name
        fields["content_sha256"] = model_files(directory).content_sha256
    return fields  # online: the worker fetches it, then inspects


def model_inspect_request(*, user, model: BaseModel) -> BaseModel:
    """Inspect a model again (a bundled one the first time, or one refused for a reason that
    has since been fixed, such as a missing file copied in)."""
    if model.team is not None:
        require(user=user, team=model.team, action=Action.MODELS)
    elif not model.pk:
        raise ValidationError("This bundled model has no row yet; run the migrations.")
    BaseModel.objects.filter(id=model.id).update(status=ModelStatus.INSPECTING, error="")
    queue.enqueue_on_commit(queue.MODEL_INSPECT, model.id)
    model.refresh_from_db()
    return model


# ---- the worker's side: claimed by attempt, so a late duplicate writes nothing ---------------


def model_inspection_claim(*, model_id: int) -> BaseModel | None:
    """The row to inspect, its attempt bumped; None when it is not waiting for inspection."""
    claimed = BaseModel.objects.filter(id=model_id, status=ModelStatus.INSPECTING).update(
        attempt=F("attempt") + 1
    )
    return BaseModel.objects.get(id=model_id) if claimed else None


def model_inspection_finish(
    *, model: BaseModel, facts: dict, commit: str = "", content_sha256: str = ""
) -> bool:
    return _finish(
        model,
        status=ModelStatus.READY,
        facts=facts,
        tasks=facts.get("tasks", []),
        commit=commit or model.commit,
        content_sha256=content_sha256 or model.content_sha256,
        error="",
    )


def model_inspection_refuse(*, model: BaseModel, error: str) -> bool:
    return _finish(model, status=ModelStatus.REFUSED, error=error[:4000])


def _finish(model: BaseModel, **fields) -> bool:
    return bool(
        BaseModel.objects.filter(
            id=model.id, status=ModelStatus.INSPECTING, attempt=model.attempt
        ).update(inspected_at=timezone.now(), **fields)
    )
