"""Launches through the API are validated by the browser's forms, so both accept exactly the
same values: a JSON payload becomes the form data the launch pages post (the run or sweep
form for where, on what and how long; the method's own form for its settings, which asks
the method's peft_core config, so a value only the config refuses is a 400 under
"method_config" naming its field, or under "grid" for a sweep item, and nothing is created).

Errors come back as DRF's 400 {"field": ["message"]}, the method form's under
"method_config"; a viewer's launch is Django's PermissionDenied (the view answers 403).
"""

from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework.exceptions import ValidationError

from webapp.accounts.permissions import Action, require
from webapp.api.errors import form_errors
from webapp.experiments import selectors
from webapp.experiments.forms import (
    ADVANCED_TRAINING,
    PLACEMENT_DEFAULTS,
    LaunchForm,
    RunForm,
    SweepForm,
)
from webapp.experiments.method_forms import (
    METHOD_FORMS,
    MethodForm,
    SweepItem,
    expand_sweep,
    method_defaults,
)

TRAIN_KEYS = (
    "steps",
    "batch_size",
    "learning_rate",
    "max_length",
    "eval_every",
    "checkpoint_every",
    "eval_metrics",
    *ADVANCED_TRAINING,
)
NO_PROJECT = "You are in no team yet: create one, or ask a team admin for an invitation."


def run_form_validate(*, user, payload: dict) -> tuple[RunForm, dict]:
    """The valid RunForm and the method's config kwargs for a POST /runs/ payload."""
    method = payload["method"]
    data = {
        **_launch_data(user=user, payload=payload),
        "name": payload.get("name") or f"{method} on {payload['base_model']}"[:120],
        "method": method,
    }
    form = _launch_form(RunForm, user=user, data=data)
    errors = {} if form.is_valid() else form_errors(form)
    method_form = _method_form(method, payload.get("method_config") or {}, errors)
    if errors:
        raise ValidationError(errors)
    return form, method_form.config_kwargs()


def sweep_form_validate(*, user, payload: dict) -> tuple[SweepForm, list[SweepItem]]:
    """The valid SweepForm and its runs (methods × grid, each checked by its method's form)."""
    methods = payload["methods"]
    default_name = f"{' + '.join(methods)} sweep on {payload['base_model']}"
    data = {
        **_launch_data(user=user, payload=payload),
        "name": payload.get("name") or default_name[:120],
        "methods": methods,
        "grid": grid_text(payload.get("grid") or {}),
        "seeds": payload.get("seeds") or 1,
    }
    form = _launch_form(SweepForm, user=user, data=data)
    if not form.is_valid():
        raise ValidationError(form_errors(form))
    try:
        cleaned = form.cleaned_data
        items = expand_sweep(
            cleaned["methods"],
            cleaned["grid"],
            form.train_config(),
            cleaned["dataset"].task,
            seeds=cleaned["seeds"],
        )
    except DjangoValidationError as exc:
        raise ValidationError({"grid": exc.messages}) from None
    return form, items


def grid_text(grid: dict[str, list]) -> str:
    """{"lora.r": [4, 8]} → "lora.r = 4, 8", the sweep form's text (the serializer has
    refused keys and values that would break its lines)."""
    return "\n".join(
        f"{key} = {', '.join(map(_form_value, values))}" for key, values in grid.items()
    )


def launch_project_id(*, user, project_id: int | None) -> int:
    """The project asked for, or the user's first where they may launch. A project of the
    user's team where their role cannot launch is PermissionDenied; another team's id is left
    to the form, which refuses it as it refuses an unknown id (no leak)."""
    visible = selectors.project_list_for_user(user=user)
    if project_id is None:
        first = selectors.project_list_for_launch(user=user).order_by("name", "id").first()
        if first is not None:
            return first.id
        viewed = visible.first()
        if viewed is not None:  # a viewer: the role matrix says why not
            require(user=user, team=viewed.team, action=Action.LAUNCH)
        raise PermissionDenied(NO_PROJECT)
    project = visible.filter(id=project_id).first()
    if project is not None:
        require(user=user, team=project.team, action=Action.LAUNCH)
    return project_id


def _launch_data(*, user, payload: dict) -> dict:
    """Form data for what runs and sweeps share; a missing (or null) train key takes the
    form's initial value, as a null method setting takes the method's default."""
    train = payload.get("train_config") or {}
    unknown = sorted(set(train) - set(TRAIN_KEYS))
    if unknown:
        raise ValidationError({"train_config": {key: [_unknown(TRAIN_KEYS)] for key in unknown}})
    values = {key: LaunchForm.base_fields[key].initial for key in TRAIN_KEYS}
    values |= {key: value for key, value in train.items() if value is not None}
    placement = {key: payload[key] for key in PLACEMENT_DEFAULTS if payload.get(key) is not None}
    return {
        "project": launch_project_id(user=user, project_id=payload.get("project")),
        "base_model": payload["base_model"],
        "dataset": payload["dataset"],
        **{key: _form_value(value) for key, value in (values | placement).items()},
    }


def _launch_form(form_class: type[LaunchForm], *, user, data: dict) -> LaunchForm:
    return form_class(
        data,
        projects=selectors.project_list_for_launch(user=user),
        datasets=selectors.dataset_list_for_user(user=user),
    )


def _method_form(method: str, config: dict, errors: dict) -> MethodForm | None:
    """The bound method form; its errors (and unknown fields) go to errors["method_config"]."""
    if method not in METHOD_FORMS:
        return None  # RunForm has said so under "method"
    form_class = METHOD_FORMS[method]
    unknown = sorted(set(config) - set(form_class.base_fields))
    given = {key: _form_value(value) for key, value in config.items() if value is not None}
    form = form_class({**method_defaults(method), **given})
    problems = {} if form.is_valid() else form_errors(form)
    problems |= {key: [_unknown(form_class.base_fields)] for key in unknown}
    if problems:
        errors["method_config"] = problems
    return form


def _unknown(known) -> str:
    return f"Unknown setting; the known ones are {', '.join(known)}."


def _form_value(value) -> str:
    """What a browser would post for a JSON value (the serializer has refused dicts, and lists
    but for train_config's list of names, which the form reads comma-separated)."""
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)
