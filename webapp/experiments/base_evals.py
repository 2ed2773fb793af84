"""The base model's evaluation, kept in PostgreSQL so that any worker reuses it.

Before training, a run evaluates the frozen base model on the validation split (eval loss and
task metrics: step 0, base_eval_*). Those figures depend on the base weights, the dataset's
rows and split, the eval settings, the metric names, the dtype and the device, and on nothing
the run trains. The first run to measure them records them under the sha256 of exactly those
parts (`base_eval_key`); a later run of the same team with the same parts reads them back
instead of evaluating again, and its log says from which run. Per team: another team's run
neither learns of this one's figures nor of its id.
"""

import hashlib
import json

from django.db import IntegrityError, transaction

from webapp.experiments.models import BaseEvaluation


def base_eval_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def base_eval_find(*, parts: dict) -> BaseEvaluation | None:
    return BaseEvaluation.objects.filter(key=base_eval_key(parts)).first()


def base_eval_record(
    *, parts: dict, metrics: dict, run_id: int, seconds: float, answers: list | None = None
) -> None:
    """Keep `metrics` (and the base's sample `answers`) for `parts`; a second run that
    measured the same meanwhile keeps the first's (both measured the same thing)."""
    try:
        with transaction.atomic():
            BaseEvaluation.objects.create(
                key=base_eval_key(parts),
                parts=parts,
                metrics=metrics,
                answers=list(answers or ()),
                run_id=run_id,
                seconds=seconds,
            )
    except IntegrityError:
        pass
