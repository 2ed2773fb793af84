"""Writes that span models. Views, forms and worker tasks call these; they hold no logic of their own.

Every write of a worker names the fence number its claim returned: once another claim has
taken the run (or the run ended), the stale worker's writes change nothing and raise.
"""

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from peft_core.data import DatasetError, label_names, parse_dataset
from webapp.accounts.models import Membership, Team
from webapp.experiments.method_forms import SweepItem
from webapp.experiments.models import (
    Artifact,
    ArtifactChunk,
    Dataset,
    MetricPoint,
    Project,
    Run,
    RunStatus,
    Sweep,
    Tag,
)

CHUNK_BYTES = 4 * 1024 * 1024


class StaleFenceError(RuntimeError):
    """The run was claimed again or ended: this worker no longer owns it."""


def _require_launcher(*, user, team: Team) -> None:
    membership = Membership.objects.filter(user=user, team=team).first()
    if membership is None or not membership.can_launch:
        raise PermissionDenied("Your role in this team cannot launch or change runs.")


def run_create(
    *,
    user,
    project: Project,
    name: str,
    base_model: str,
    dataset: Dataset,
    method: str,
    method_config: dict,
    train_config: dict,
    sweep: Sweep | None = None,
) -> Run:
    """Insert a queued run and enqueue its training once the transaction commits."""
    from workers.tasks import train_run

    _require_launcher(user=user, team=project.team)
    run = Run.objects.create(
        project=project,
        sweep=sweep,
        name=name,
        created_by=user,
        base_model=base_model,
        dataset=dataset,
        method=method,
        method_config=method_config,
        train_config=train_config,
        total_steps=int(train_config.get("steps", 0)),
    )
    train_run.delay_on_commit(run.id)
    return run


def sweep_create(
    *,
    user,
    project: Project,
    name: str,
    base_model: str,
    dataset: Dataset,
    items: list[SweepItem],
    grid: dict,
    train_config: dict,
) -> Sweep:
    """One Sweep row and one queued run per item, all enqueued once the transaction commits."""
    _require_launcher(user=user, team=project.team)
    with transaction.atomic():
        sweep = Sweep.objects.create(
            project=project,
            name=name,
            created_by=user,
            base_model=base_model,
            dataset=dataset,
            grid={
                "methods": sorted({i.method for i in items}),
                "grid": grid,
                "train": train_config,
            },
        )
        for item in items:
            run_create(
                user=user,
                project=project,
                name=f"{name} · {item.label}"[:120],
                base_model=base_model,
                dataset=dataset,
                method=item.method,
                method_config=item.config,
                train_config=train_config,
                sweep=sweep,
            )
    return sweep


def run_cancel_request(*, user, run: Run) -> Run:
    """A queued run is cancelled at once; a running one is flagged and stops within one step."""
    _require_launcher(user=user, team=run.project.team)
    now = timezone.now()
    Run.objects.filter(id=run.id, status=RunStatus.QUEUED).update(
        status=RunStatus.CANCELLED, cancel_requested=True, finished_at=now
    )
    Run.objects.filter(id=run.id, status=RunStatus.RUNNING).update(cancel_requested=True)
    run.refresh_from_db()
    return run


def run_tag_add(*, user, run: Run, name: str) -> Tag:
    _require_launcher(user=user, team=run.project.team)
    name = name.strip()
    if not name or len(name) > 50:
        raise ValidationError("A tag has 1 to 50 characters.")
    tag, _ = Tag.objects.get_or_create(run=run, name=name)
    return tag


def run_tag_remove(*, user, run: Run, name: str) -> None:
    _require_launcher(user=user, team=run.project.team)
    Tag.objects.filter(run=run, name=name).delete()


def run_claim(*, run_id: int, worker: str) -> int | None:
    """Take a queued run for this worker. Returns the new fence, or None if it was not queued."""
    now = timezone.now()
    with transaction.atomic():
        claimed = Run.objects.filter(id=run_id, status=RunStatus.QUEUED).update(
            status=RunStatus.RUNNING,
            fence=F("fence") + 1,
            attempt=F("attempt") + 1,
            worker=worker[:255],
            started_at=now,
            heartbeat_at=now,
            error="",
        )
        if claimed != 1:
            return None
        return Run.objects.values_list("fence", flat=True).get(id=run_id)


def _owned(run_id: int, fence: int):
    return Run.objects.filter(id=run_id, fence=fence, status=RunStatus.RUNNING)


def run_heartbeat(*, run_id: int, fence: int, step: int) -> bool:
    """Record progress; returns whether a cancel was requested."""
    if not _owned(run_id, fence).update(step=step, heartbeat_at=timezone.now()):
        raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
    return Run.objects.values_list("cancel_requested", flat=True).get(id=run_id)


def run_log_append(*, run_id: int, fence: int, lines: Iterable[str]) -> None:
    with transaction.atomic():
        run = _owned(run_id, fence).select_for_update().only("log").first()
        if run is None:
            raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
        kept = (run.log.splitlines() + list(lines))[-settings.RUN_LOG_LINES :]
        _owned(run_id, fence).update(log="\n".join(kept))


@dataclass(frozen=True)
class Point:
    key: str
    step: int
    value: float
    wall_time: float


def metrics_record(*, run_id: int, fence: int, points: list[Point]) -> int:
    """Insert a batch of points; a point already stored (same run, key, step) is kept as it was."""
    if not _owned(run_id, fence).exists():
        raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
    rows = [
        MetricPoint(run_id=run_id, key=p.key, step=p.step, value=p.value, wall_time=p.wall_time)
        for p in points
    ]
    MetricPoint.objects.bulk_create(rows, batch_size=1000, ignore_conflicts=True)
    return len(rows)


def artifact_store(*, run_id: int, fence: int, kind: str, name: str, data: bytes) -> Artifact:
    """Store one file of a run as chunk rows; replaces an earlier file of the same name."""
    with transaction.atomic():
        if not _owned(run_id, fence).select_for_update().exists():
            raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
        Artifact.objects.filter(run_id=run_id, kind=kind, name=name).delete()
        artifact = Artifact.objects.create(
            run_id=run_id,
            kind=kind,
            name=name,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        ArtifactChunk.objects.bulk_create(
            ArtifactChunk(artifact=artifact, index=i, data=data[start : start + CHUNK_BYTES])
            for i, start in enumerate(range(0, max(len(data), 1), CHUNK_BYTES))
        )
    return artifact


def run_finish(
    *,
    run_id: int,
    fence: int,
    status: str,
    error: str = "",
    summary: dict | None = None,
    profile: dict | None = None,
) -> None:
    fields = {"status": status, "finished_at": timezone.now(), "error": error[:10_000]}
    if summary is not None:
        fields["summary"] = summary
    if profile is not None:
        fields["profile"] = profile
    if not _owned(run_id, fence).update(**fields):
        raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")


def dataset_upload_create(
    *, user, team: Team, name: str, filename: str, data: bytes, task: str
) -> Dataset:
    """Parse and validate an upload; raises ValidationError naming the line, storing nothing."""
    _require_launcher(user=user, team=team)
    fmt = _upload_format(filename)
    try:
        rows = parse_dataset(data, fmt=fmt, task=task, max_rows=settings.DATASET_MAX_ROWS)
    except DatasetError as exc:
        raise ValidationError(str(exc)) from None
    content = "\n".join(json.dumps(row, ensure_ascii=False) for row in rows).encode()
    return Dataset.objects.create(
        team=team,
        name=name,
        task=task,
        original_name=filename[:255],
        file_format=fmt,
        content=content,
        columns=sorted({key for row in rows for key in row}),
        label_names=label_names(rows) if task == "seq-cls" else [],
        row_count=len(rows),
        sha256=hashlib.sha256(data).hexdigest(),
        created_by=user,
    )


def _upload_format(filename: str) -> str:
    lowered = filename.lower()
    if lowered.endswith(".csv"):
        return "csv"
    if lowered.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    raise ValidationError("Upload a .csv or .jsonl file.")
