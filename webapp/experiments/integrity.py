"""The scheduled check of stored bytes (`python manage.py verify_artifacts`).

Downloads check what they send; this checks what nobody downloads, so damage (a flipped
bit on a disk, an object changed behind our back, a file gone) shows on the run page and in
the API before someone needs the file, and a presigned download, which bypasses the web's
hash, is covered too. Each pass re-reads the files checked longest ago (never checked
first), up to a byte budget, and records the outcome on each row (run files and uploaded
datasets alike). It also deletes what no row can name: files under runs/ or datasets/
without a row and `.partial-` leftovers of crashed writes, once they are older than a day
(an upload in flight is younger).
"""

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db.models import F, Q
from django.utils import timezone

from webapp.experiments.artifacts import artifact_verify
from webapp.experiments.dataset_files import DatasetDamaged, dataset_check, dataset_chunks
from webapp.experiments.models import Artifact, Dataset
from webapp.experiments.store import PARTIAL_PREFIX, artifact_storage, store_delete, store_walk

logger = logging.getLogger(__name__)

ORPHAN_AGE = timedelta(days=1)


@dataclass
class Checked:
    files: int = 0
    bytes: int = 0
    damaged: list[str] = field(default_factory=list)  # "run 3 adapter_model.safetensors v1: …"


def verify_due(*, max_bytes: int, now=None) -> Checked:
    """Check the stored files whose last check is older than ARTIFACT_RECHECK_DAYS (or that
    were never checked), oldest first, until `max_bytes` have been read."""
    now = now or timezone.now()
    due = Artifact.objects.filter(
        Q(checked_at__isnull=True)
        | Q(checked_at__lt=now - timedelta(days=settings.ARTIFACT_RECHECK_DAYS))
    ).order_by(F("checked_at").asc(nulls_first=True), "id")
    checked = Checked()
    for artifact in due.iterator(chunk_size=100):
        if checked.files and checked.bytes + artifact.size > max_bytes:
            break
        problem = artifact_verify(artifact)
        checked.files += 1
        checked.bytes += artifact.size
        if problem:
            where = f"run {artifact.run_id} {artifact.kind} {artifact.name} v{artifact.version}"
            checked.damaged.append(f"{where}: {problem}")
            logger.error("damaged: %s: %s", where, problem)
    return checked


def verify_datasets_due(*, max_bytes: int, now=None) -> Checked:
    """The same for uploaded datasets' files."""
    now = now or timezone.now()
    due = (
        Dataset.objects.exclude(file_key="")
        .filter(
            Q(checked_at__isnull=True)
            | Q(checked_at__lt=now - timedelta(days=settings.ARTIFACT_RECHECK_DAYS))
        )
        .order_by(F("checked_at").asc(nulls_first=True), "id")
    )
    checked = Checked()
    for dataset in due.iterator(chunk_size=100):
        if checked.files and checked.bytes + dataset.file_size > max_bytes:
            break
        try:
            dataset_check(dataset)
            for _ in dataset_chunks(dataset):
                pass
        except DatasetDamaged as exc:
            checked.damaged.append(f"dataset {dataset.id} ({dataset.name}): {exc}")
            logger.error("damaged: dataset %s: %s", dataset.id, exc)
        checked.files += 1
        checked.bytes += dataset.file_size
    return checked


def sweep_runs_folder(*, now=None) -> list[str]:
    """Delete files under runs/ and datasets/ that no row names and that are older than a
    day; returns their keys."""
    now = now or timezone.now()
    storage = artifact_storage()
    named = set(Artifact.objects.exclude(key="").values_list("key", flat=True))
    named |= set(Dataset.objects.exclude(file_key="").values_list("file_key", flat=True))
    doomed = []
    for key in (*store_walk("runs/"), *store_walk("datasets/")):
        if key in named:
            continue
        try:
            modified = storage.get_modified_time(key)
        except FileNotFoundError:
            continue
        if now - modified > ORPHAN_AGE:
            doomed.append(key)
    store_delete(doomed)
    for key in doomed:
        kind = "partial write" if key.rsplit("/", 1)[-1].startswith(PARTIAL_PREFIX) else "orphan"
        logger.warning("deleted %s %s", kind, key)
    return doomed
