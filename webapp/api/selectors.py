"""Reads the API needs beyond webapp.experiments.selectors.

The runs passed in come from a `*_for_user` selector already: nothing here widens access.
"""

from django import forms
from django.db.models import OuterRef, Subquery
from django.forms.utils import pretty_name

from webapp.experiments.downsample import finite_or_none
from webapp.experiments.method_forms import METHOD_FORMS
from webapp.experiments.metrics import metric_keys_stored
from webapp.experiments.models import MetricPoint, Run

LATEST_KEYS = ("train_loss", "eval_loss")


def run_latest_metrics(*, run_ids: list[int]) -> dict[int, dict[str, float | None]]:
    """{run id: {key: value at the key's highest step, or None}} in one query for all runs."""

    def latest(key: str) -> Subquery:
        points = MetricPoint.objects.filter(run=OuterRef("pk"), key=key).order_by("-step")
        return Subquery(points.values("value")[:1])

    rows = Run.objects.filter(id__in=run_ids).values("id")
    rows = rows.annotate(**{f"latest_{key}": latest(key) for key in LATEST_KEYS})
    return {
        row["id"]: {key: finite_or_none(row[f"latest_{key}"]) for key in LATEST_KEYS}
        for row in rows
    }


def metric_keys_page(*, run: Run, cursor: str = "", size: int) -> tuple[list[str], str | None]:
    """Up to `size` of the run's metric keys after `cursor` (a key; "" from the start), and
    the cursor of the next page (its last key), None on the last page."""
    keys = metric_keys_stored(run_id=run.id, after=cursor, limit=size + 1)
    return keys[:size], (keys[size - 1] if len(keys) > size else None)


# Subclasses first: a FloatField is an IntegerField in Django.
FIELD_TYPES = (
    (forms.BooleanField, "boolean"),
    (forms.FloatField, "number"),
    (forms.IntegerField, "integer"),
    (forms.ChoiceField, "choice"),
    (forms.CharField, "string"),
)


def method_specs() -> list[dict]:
    """Each method's form described as data: what the launch page shows, for API clients."""
    return [
        {
            "key": key,
            "title": form.title,
            "summary": form.summary,
            "fields": {name: _field_spec(name, f) for name, f in form.base_fields.items()},
        }
        for key, form in METHOD_FORMS.items()
    ]


def _field_spec(name: str, field: forms.Field) -> dict:
    kind = next(kind for cls, kind in FIELD_TYPES if isinstance(field, cls))
    spec = {
        "type": kind,
        "label": str(field.label or pretty_name(name)),
        "default": _default(kind, field.initial),
        "help": str(field.help_text),
    }
    if getattr(field, "min_value", None) is not None:
        spec["min"] = field.min_value
    if getattr(field, "max_value", None) is not None:
        spec["max"] = field.max_value
    if kind == "choice":
        spec["choices"] = [value for value, _ in field.choices]
    if kind == "string" and field.max_length is not None:
        spec["max_length"] = field.max_length
    return spec


def _default(kind: str, initial):
    if initial is not None:
        return initial
    return {"boolean": False, "string": ""}.get(kind)
