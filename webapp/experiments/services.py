"""Writes that span models. Views, forms and worker tasks call these; they hold no logic of their own.

Every write of a worker names the fence number its claim returned: once another claim has
taken the run (or the run ended), the stale worker's writes change nothing and raise.
"""

import csv
import hashlib
import io
import json
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from peft_core.data import DatasetError, label_names, parse_dataset
from webapp.accounts.models import Team
from webapp.accounts.permissions import Action, require
from webapp.accounts.secrets import secret_new
from webapp.accounts.services import audit_record
from webapp.experiments.adapter_upload import too_large_message, validate_adapter
from webapp.experiments.method_forms import SweepItem
from webapp.experiments.models import (
    CLAIMABLE_STATUSES,
    FINISHED_STATUSES,
    ROLLUP_WIDTHS,
    Artifact,
    ArtifactChunk,
    Comment,
    Dataset,
    FailureClass,
    MetricPoint,
    PlaygroundPrompt,
    PlaygroundStatus,
    PlaygroundVote,
    Project,
    Run,
    RunStatus,
    ShareLink,
    ShareScope,
    Sweep,
    Tag,
)

CHUNK_BYTES = 4 * 1024 * 1024


class StaleFenceError(RuntimeError):
    """The run was claimed again or ended: this worker no longer owns it."""


def _require_launcher(*, user, team: Team) -> None:
    require(user=user, team=team, action=Action.LAUNCH)


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
    Run.objects.filter(id=run.id, status__in=CLAIMABLE_STATUSES).update(
        status=RunStatus.CANCELLED, cancel_requested=True, finished_at=now, fence=F("fence") + 1
    )
    Run.objects.filter(id=run.id, status=RunStatus.RUNNING).update(cancel_requested=True)
    run.refresh_from_db()
    return run


def run_tag_add(*, user, run: Run, name: str) -> Tag:
    require(user=user, team=run.project.team, action=Action.ANNOTATE)
    name = name.strip()
    if not name or len(name) > 50:
        raise ValidationError("A tag has 1 to 50 characters.")
    tag, _ = Tag.objects.get_or_create(run=run, name=name)
    return tag


def run_tag_remove(*, user, run: Run, name: str) -> None:
    require(user=user, team=run.project.team, action=Action.ANNOTATE)
    Tag.objects.filter(run=run, name=name).delete()


def run_claim(*, run_id: int, worker: str) -> int | None:
    """Take a queued (or lost) run for this worker. Returns the new fence, or None.

    None means someone else holds or ended it: a duplicate delivery, a cancel, or a second
    message sent by the reaper for a run another worker already took.
    """
    now = timezone.now()
    with transaction.atomic():
        claimed = Run.objects.filter(id=run_id, status__in=CLAIMABLE_STATUSES).update(
            status=RunStatus.RUNNING,
            fence=F("fence") + 1,
            attempt=F("attempt") + 1,
            worker=worker[:255],
            started_at=Coalesce(F("started_at"), now),
            heartbeat_at=now,
            error="",
            failure_class="",
        )
        if claimed != 1:
            return None
        return Run.objects.values_list("fence", flat=True).get(id=run_id)


def _owned(run_id: int, fence: int):
    return Run.objects.filter(id=run_id, fence=fence, status=RunStatus.RUNNING)


def run_heartbeat(*, run_id: int, fence: int, step: int | None = None) -> bool:
    """Renew the lease (and record progress); returns whether a cancel was requested."""
    fields = {"heartbeat_at": timezone.now()}
    if step is not None:
        fields["step"] = step
    if not _owned(run_id, fence).update(**fields):
        raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
    return Run.objects.values_list("cancel_requested", flat=True).get(id=run_id)


def run_log_append(*, run_id: int, fence: int, lines: Iterable[str]) -> None:
    with transaction.atomic():
        run = _owned(run_id, fence).select_for_update().only("log").first()
        if run is None:
            raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
        _owned(run_id, fence).update(log=_log_with(run.log, list(lines)))


@dataclass(frozen=True)
class Point:
    key: str
    step: int
    value: float
    wall_time: float


def metrics_record(*, run_id: int, fence: int, points: list[Point]) -> int:
    """Insert a batch of points; a point already stored (same run, key, step) is kept as it was."""
    with transaction.atomic():
        # The fence is checked under the run row's lock, so a new claim (an UPDATE of that
        # row) waits for this batch and a zombie's batch cannot land after it.
        if not _owned(run_id, fence).select_for_update(no_key=True).exists():
            raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
        return _metric_points_insert(run_id=run_id, points=points)


def _metric_points_insert(*, run_id: int, points: list[Point]) -> int:
    """Store the finite points, skipping those already stored; returns how many were finite.

    A non-finite value is left out: JSON has no NaN, SQLite stores none, and the training
    loop already fails the run when its loss stops being finite. PostgreSQL takes the batch
    in one COPY into a temporary table and one INSERT … ON CONFLICT DO NOTHING from it.
    """
    finite = [p for p in points if math.isfinite(p.value) and math.isfinite(p.wall_time)]
    if connection.vendor == "postgresql":
        _metric_points_copy(run_id=run_id, points=finite)
    else:
        rows = [
            MetricPoint(run_id=run_id, key=p.key, step=p.step, value=p.value, wall_time=p.wall_time)
            for p in finite
        ]
        MetricPoint.objects.bulk_create(rows, batch_size=1000, ignore_conflicts=True)
    return len(finite)


# ON COMMIT DELETE ROWS empties the table at each commit; the DELETE … RETURNING empties it
# at once, so a second batch in the same (outer) transaction never sees the first one's rows.
METRIC_STAGING = """CREATE TEMPORARY TABLE IF NOT EXISTS metric_staging
    (key varchar(64), step integer, value double precision, wall_time double precision)
    ON COMMIT DELETE ROWS"""
METRIC_COPY = "COPY metric_staging (key, step, value, wall_time) FROM STDIN WITH (FORMAT csv)"


# One statement moves the staged points into the table and folds the ones that were new (a
# point already stored is skipped, so a batch sent twice counts once) into the series'
# rollups at every width: ~10 rollup rows per 1000 points, merged on conflict.
def _rollup_merge(part: str, compare: str, *columns: str) -> str:
    """SET clauses: take the batch's `part` summary where it wins the comparison."""
    ours = f"({', '.join(f'EXCLUDED.{part}_{c}' for c in columns)})"
    theirs = f"({', '.join(f'r.{part}_{c}' for c in columns)})"
    return ", ".join(
        f"{part}_{c} = CASE WHEN {ours} {compare} {theirs} THEN EXCLUDED.{part}_{c} "
        f"ELSE r.{part}_{c} END"
        for c in ("step", "value", "wall")
    )


# Folds the points of the CTE `new_points` (key, step, value, wall_time: points that were not
# stored before) into the rollups, each width merged into what the rollup rows hold.
ROLLUP_FOLD = f"""
finest AS (  -- the new points summed up at the finest width; the coarser widths from these
    SELECT key, step / %(finest)s AS bucket, count(*) AS n,
        min(ARRAY[step, value, wall_time]) AS f, max(ARRAY[step, value, wall_time]) AS l,
        min(ARRAY[value, step, wall_time]) AS lo, max(ARRAY[value, step, wall_time]) AS hi
    FROM new_points GROUP BY key, step / %(finest)s
)
INSERT INTO experiments_metricrollup AS r (run_id, key, width, bucket, count,
    first_step, first_value, first_wall, last_step, last_value, last_wall,
    low_step, low_value, low_wall, high_step, high_value, high_wall)
SELECT %(run_id)s, key, width, bucket, n, f[1]::integer, f[2], f[3], l[1]::integer, l[2], l[3],
    lo[2]::integer, lo[1], lo[3], hi[2]::integer, hi[1], hi[3]
FROM (
    SELECT key, %(finest)s AS width, bucket, n, f, l, lo, hi FROM finest
    UNION ALL
    SELECT key, width, bucket * %(finest)s / width, sum(n), min(f), max(l), min(lo), max(hi)
    FROM finest CROSS JOIN unnest(%(coarser)s::integer[]) AS w (width)
    GROUP BY key, width, bucket * %(finest)s / width
) AS buckets
ON CONFLICT (run_id, key, width, bucket) DO UPDATE SET count = r.count + EXCLUDED.count,
    {_rollup_merge("first", "<", "step")},
    {_rollup_merge("last", ">", "step")},
    {_rollup_merge("low", "<", "value", "step")},
    {_rollup_merge("high", ">", "value", "step")}
"""
# Each coarser width is a multiple of the finest, so its buckets are unions of finest ones.
ROLLUP_WIDTH_PARAMS = {"finest": ROLLUP_WIDTHS[0], "coarser": list(ROLLUP_WIDTHS[1:])}
assert all(width % ROLLUP_WIDTHS[0] == 0 for width in ROLLUP_WIDTHS)

# Any batch: staged, moved in skipping the points already stored, the new ones folded in.
METRIC_MOVE = (
    """
WITH staged AS (DELETE FROM metric_staging RETURNING *),
new_points AS (
    INSERT INTO experiments_metricpoint (run_id, key, step, value, wall_time)
    SELECT %(run_id)s, key, step, value, wall_time FROM staged
    ON CONFLICT (run_id, key, step) DO NOTHING
    RETURNING key, step, value, wall_time
),"""
    + ROLLUP_FOLD
)

# A batch that only appends (each key's steps after its last stored one, none twice) cannot
# conflict: it is copied straight into the table, and its points, each series' steps from the
# batch's first on, read back from the (covering) unique index to be folded in.
METRIC_LAST_STEPS = """
SELECT k.key, r.last_step
FROM unnest(%(keys)s::varchar[]) AS k (key)
CROSS JOIN LATERAL (
    SELECT last_step FROM experiments_metricrollup
    WHERE run_id = %(run_id)s AND key = k.key AND width = %(coarsest)s
    ORDER BY bucket DESC LIMIT 1
) AS r
"""
METRIC_COPY_DIRECT = """COPY experiments_metricpoint (run_id, key, step, value, wall_time)
    FROM STDIN WITH (FORMAT csv)"""
METRIC_FOLD_APPENDED = (
    """
WITH new_points AS (
    SELECT b.key, p.step, p.value, p.wall_time
    FROM unnest(%(keys)s::varchar[], %(from_steps)s::integer[]) AS b (key, step)
    CROSS JOIN LATERAL (
        SELECT step, value, wall_time FROM experiments_metricpoint
        WHERE run_id = %(run_id)s AND key = b.key AND step >= b.step
    ) AS p
),"""
    + ROLLUP_FOLD
)


def _metric_points_copy(*, run_id: int, points: list[Point]) -> None:
    """Store a batch on PostgreSQL, with its series' rollups. The caller holds the run's row
    lock, so no other batch of the run lands between the check for appending and the copy."""
    if not points:
        return
    rows = [(p.key, int(p.step), float(p.value), float(p.wall_time)) for p in points]
    first_steps: dict[str, int] = {}
    for key, step, _, _ in rows:
        first_steps[key] = min(step, first_steps.get(key, step))
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
    with transaction.atomic(savepoint=False), connection.cursor() as cursor:
        keys = {"keys": list(first_steps), "run_id": run_id}
        if _appends(cursor, keys, first_steps, rows):
            writer.writerows((run_id, *row) for row in rows)
            buffer.seek(0)
            cursor.copy_expert(METRIC_COPY_DIRECT, buffer)
            from_steps = {"from_steps": list(first_steps.values())}
            cursor.execute(METRIC_FOLD_APPENDED, ROLLUP_WIDTH_PARAMS | keys | from_steps)
            return
        writer.writerows(rows)
        buffer.seek(0)
        # Inside metrics_record's transaction no savepoint is needed (the batch is all or
        # nothing with it); alone, this is the transaction the staged rows live in.
        if (raw := connection.connection) not in _STAGING_CREATED:  # once per session
            cursor.execute(METRIC_STAGING)
            # Only once committed: a rolled-back transaction takes the new table with it.
            transaction.on_commit(lambda: _STAGING_CREATED.add(raw))
        cursor.copy_expert(METRIC_COPY, buffer)
        cursor.execute(METRIC_MOVE, ROLLUP_WIDTH_PARAMS | {"run_id": run_id})


def _appends(cursor, keys: dict, first_steps: dict[str, int], rows: list[tuple]) -> bool:
    """Whether every point is new: no (key, step) twice in the batch, and each key's first
    step after the last one stored (read from the coarsest rollups)."""
    if len({(key, step) for key, step, _, _ in rows}) != len(rows):
        return False
    cursor.execute(METRIC_LAST_STEPS, keys | {"coarsest": ROLLUP_WIDTHS[-1]})
    return all(first_steps[key] > last_step for key, last_step in cursor.fetchall())


# The database connections (DB-API objects; a reconnect makes a new one) whose session
# already has the temporary staging table.
_STAGING_CREATED: "weakref.WeakSet" = weakref.WeakSet()


def artifact_store(*, run_id: int, fence: int, kind: str, name: str, data: bytes) -> Artifact:
    """Store one file of a run as chunk rows; replaces an earlier file of the same name."""
    with transaction.atomic():
        if not _owned(run_id, fence).select_for_update().exists():
            raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
        Artifact.objects.filter(run_id=run_id, kind=kind, name=name).delete()
        return _artifact_insert(run_id=run_id, kind=kind, name=name, data=data)


def _artifact_insert(*, run_id: int, kind: str, name: str, data: bytes) -> Artifact:
    artifact = Artifact.objects.create(
        run_id=run_id, kind=kind, name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest()
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
    failure_class: str = "",
    summary: dict | None = None,
    profile: dict | None = None,
) -> None:
    """End the run; its checkpoints go with it (a finished run is never resumed)."""
    fields = {
        "status": status,
        "finished_at": timezone.now(),
        "error": error[:10_000],
        "failure_class": failure_class,
    }
    if summary is not None:
        fields["summary"] = summary
    if profile is not None:
        fields["profile"] = profile
    with transaction.atomic():
        if not _owned(run_id, fence).update(**fields):
            raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
        Artifact.objects.filter(run_id=run_id, kind=CHECKPOINT_KIND).delete()


# ---- checkpoints and the reaper -----------------------------------------------------------

CHECKPOINT_KIND = "checkpoint"


def checkpoint_store(*, run_id: int, fence: int, files: dict[str, bytes]) -> None:
    """Replace the run's checkpoint with `files`, all or nothing (one transaction)."""
    with transaction.atomic():
        if not _owned(run_id, fence).select_for_update().exists():
            raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
        Artifact.objects.filter(run_id=run_id, kind=CHECKPOINT_KIND).delete()
        for name, data in sorted(files.items()):
            _artifact_insert(run_id=run_id, kind=CHECKPOINT_KIND, name=name, data=data)


def checkpoint_files(*, run_id: int) -> dict[str, bytes]:
    """The run's last checkpoint as {file name: bytes}; empty when it has none."""
    return artifact_files(run_id=run_id, kind=CHECKPOINT_KIND)


def artifact_files(*, run_id: int, kind: str) -> dict[str, bytes]:
    """The run's files of one kind as {file name: bytes}, for a worker (no user check)."""
    files = {}
    for artifact in Artifact.objects.filter(run_id=run_id, kind=kind):
        chunks = artifact.chunks.order_by("index").values_list("data", flat=True)
        files[artifact.name] = b"".join(bytes(chunk) for chunk in chunks)
    return files


@dataclass(frozen=True)
class Reaped:
    lost: list[int]  # marked lost: to be sent to a worker again
    failed: list[int]  # out of attempts: failed as worker-lost


def runs_reap(*, lease_s: float, max_attempts: int) -> Reaped:
    """Mark runs whose lease expired lost (or failed, once out of attempts).

    Marking a run lost moves its fence on, so the presumed-dead worker's late writes are
    refused even before another worker claims it. The caller sends the lost runs' ids to
    the queue after this returns (committed).
    """
    now = timezone.now()
    lost, failed = [], []
    with transaction.atomic():
        stale = (
            Run.objects.select_for_update(skip_locked=True)
            .filter(status=RunStatus.RUNNING, heartbeat_at__lt=now - timedelta(seconds=lease_s))
            .exclude(worker=EXTERNAL_WORKER)  # trained elsewhere: no lease to expire
            .only("id", "attempt", "worker", "heartbeat_at", "log")
        )
        for run in stale:
            since = run.heartbeat_at.strftime("%H:%M:%S UTC")
            reason = f"worker {run.worker} stopped sending heartbeats at {since}"
            if run.attempt >= max_attempts:
                fields = {
                    "status": RunStatus.FAILED,
                    "failure_class": FailureClass.WORKER_LOST,
                    "error": f"{reason}; gave up after {run.attempt} attempts",
                    "finished_at": now,
                }
                failed.append(run.id)
            else:
                fields = {
                    "status": RunStatus.LOST,
                    "error": f"{reason}; sent again (attempt {run.attempt + 1} of {max_attempts})",
                    "heartbeat_at": now,  # from here on: since when it waits as lost
                }
                lost.append(run.id)
            Run.objects.filter(id=run.id).update(
                fence=F("fence") + 1, log=_log_with(run.log, [f"lost: {fields['error']}"]), **fields
            )
    return Reaped(lost=lost, failed=failed)


def runs_unclaimed(*, older_than_s: float) -> list[int]:
    """Queued or lost runs no worker has claimed for a while (oldest first)."""
    since = timezone.now() - timedelta(seconds=older_than_s)
    queued = Q(status=RunStatus.QUEUED, created_at__lt=since)
    lost = Q(status=RunStatus.LOST, heartbeat_at__lt=since)
    return list(Run.objects.filter(queued | lost).order_by("id").values_list("id", flat=True))


def _log_with(log: str, lines: list[str]) -> str:
    return "\n".join((log.splitlines() + lines)[-settings.RUN_LOG_LINES :])


def dataset_upload_create(
    *, user, team: Team, name: str, filename: str, data: bytes, task: str
) -> Dataset:
    """Parse and validate an upload; raises ValidationError naming the line, storing nothing.

    The rows are stored in the database; nothing is written to disk. The client's file name
    is kept only as text to show (`original_name`), never used as a path.
    """
    _require_launcher(user=user, team=team)
    original_name = _upload_name(filename)
    fmt = _upload_format(original_name)
    if len(data) > settings.DATASET_MAX_BYTES:
        raise ValidationError(f"The file is larger than {settings.DATASET_MAX_BYTES:,} bytes.")
    try:
        rows = parse_dataset(data, fmt=fmt, task=task, max_rows=settings.DATASET_MAX_ROWS)
    except DatasetError as exc:
        raise ValidationError(str(exc)) from None
    content = "\n".join(_jsonl_line(row) for row in rows).encode()
    return Dataset.objects.create(
        team=team,
        name=name,
        task=task,
        original_name=original_name,
        file_format=fmt,
        content=content,
        columns=sorted({key for row in rows for key in row}),
        label_names=label_names(rows) if task == "seq-cls" else [],
        row_count=len(rows),
        sha256=hashlib.sha256(data).hexdigest(),
        created_by=user,
    )


# Characters that str.splitlines() breaks on and json.dumps leaves raw: escaped, so that the
# stored JSON lines split back into exactly one row per line.
LINE_BREAKS_ESCAPED = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _jsonl_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False).translate(LINE_BREAKS_ESCAPED)


def _upload_name(filename: str) -> str:
    """The last path part of a client's file name, printable and at most 255 characters:
    text to show, never a path (`../../etc/passwd.csv` is kept as `passwd.csv`)."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    printable = "".join(char for char in base if char.isprintable())
    return " ".join(printable.split())[-255:]


def _upload_format(filename: str) -> str:
    lowered = filename.lower()
    if lowered.endswith(".csv"):
        return "csv"
    if lowered.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    raise ValidationError("Upload a .csv or .jsonl file.")


# ---- notes, comments, deletion ------------------------------------------------------------

NOTES_MAX_CHARS = 20_000
COMMENT_MAX_CHARS = 5_000


def run_notes_update(*, user, run: Run, notes: str) -> Run:
    require(user=user, team=run.project.team, action=Action.ANNOTATE)
    if len(notes) > NOTES_MAX_CHARS:
        raise ValidationError(f"Notes hold at most {NOTES_MAX_CHARS:,} characters.")
    Run.objects.filter(id=run.id).update(notes=notes)
    run.notes = notes
    return run


def comment_create(*, user, run: Run, body: str) -> Comment:
    require(user=user, team=run.project.team, action=Action.ANNOTATE)
    body = body.strip()
    if not body or len(body) > COMMENT_MAX_CHARS:
        raise ValidationError(f"A comment has 1 to {COMMENT_MAX_CHARS:,} characters.")
    return Comment.objects.create(run=run, author=user, body=body)


def comment_delete(*, user, comment: Comment) -> None:
    """Authors delete their own comments; admins and owners delete any."""
    team = comment.run.project.team
    if comment.author_id == user.id:
        require(user=user, team=team, action=Action.ANNOTATE)
    else:
        require(user=user, team=team, action=Action.DELETE)
    comment.delete()


def run_delete(*, user, run: Run, ip: str | None = None) -> None:
    """Delete a finished run with its metrics and adapter; a live run must be cancelled first."""
    team = run.project.team
    require(user=user, team=team, action=Action.DELETE)
    target = f"run {run.id} “{run.name}”"
    with transaction.atomic():
        # Under the run's row lock: no claim (an UPDATE of the row) and no metric batch (it
        # locks the row too) can slip in between the check and the delete of its points.
        locked = Run.objects.select_for_update().filter(id=run.id).first()
        if locked is not None and not locked.is_finished:  # a lost run is sent again
            raise ValidationError(
                "Cancel the run first: a queued, running or lost run cannot be deleted."
            )
        run.delete()
    audit_record(actor=user, team=team, action="run.delete", target=target, ip=ip)


def sweep_delete(*, user, sweep: Sweep, ip: str | None = None) -> int:
    """Delete a sweep and its runs; refused while any of them is unfinished (queued, running, lost)."""
    team = sweep.project.team
    require(user=user, team=team, action=Action.DELETE)
    target = f"sweep {sweep.id} “{sweep.name}”"
    with transaction.atomic():
        statuses = sweep.runs.select_for_update().order_by("id").values_list("status", flat=True)
        if any(status not in FINISHED_STATUSES for status in statuses):  # locked as run_delete
            raise ValidationError("Cancel the sweep's live runs first.")
        deleted, _ = sweep.runs.all().delete()
        sweep.delete()
    audit_record(actor=user, team=team, action="sweep.delete", target=target, ip=ip)
    return deleted


def dataset_delete(*, user, dataset: Dataset, ip: str | None = None) -> None:
    if dataset.team is None:
        raise ValidationError("Built-in datasets cannot be deleted.")
    require(user=user, team=dataset.team, action=Action.DELETE)
    if dataset.runs.exists() or dataset.sweeps.exists():
        raise ValidationError("Runs use this dataset; delete them first.")
    target = f"dataset {dataset.id} “{dataset.name}”"
    dataset.delete()
    audit_record(actor=user, team=dataset.team, action="dataset.delete", target=target, ip=ip)


# ---- share links --------------------------------------------------------------------------

SHARE_LINK_PREFIX = "pls"


def share_link_create(
    *,
    user,
    team: Team,
    scope: str,
    run: Run | None = None,
    run_ids: list[int] | None = None,
    days: int = 30,
    ip: str | None = None,
) -> tuple[ShareLink, str]:
    """A read-only link and its secret (shown once). The caller has checked the runs' team."""
    require(user=user, team=team, action=Action.SHARE)
    if not 1 <= days <= settings.SHARE_LINK_MAX_DAYS:
        raise ValidationError(f"A link lives 1 to {settings.SHARE_LINK_MAX_DAYS} days.")
    if scope == ShareScope.RUN and (run is None or run.project.team_id != team.id):
        raise ValidationError("A run link needs one of the team's runs.")
    if scope == ShareScope.COMPARE and not run_ids:
        raise ValidationError("A comparison link needs at least one run.")
    plain, digest = secret_new(SHARE_LINK_PREFIX)
    link = ShareLink.objects.create(
        team=team,
        scope=scope,
        run=run if scope == ShareScope.RUN else None,
        run_ids=list(run_ids or []) if scope == ShareScope.COMPARE else [],
        digest=digest,
        created_by=user,
        expires_at=timezone.now() + timedelta(days=days),
    )
    detail = {"scope": scope, "days": days, "run": run.id if run else None, "runs": run_ids}
    audit_record(
        actor=user, team=team, action="share_link.create", target=str(link), detail=detail, ip=ip
    )
    return link, plain


def share_link_revoke(*, user, link: ShareLink, ip: str | None = None) -> None:
    """The link's creator (member or above) or an admin revokes it; it answers 404 from then on."""
    if link.created_by_id == user.id:
        require(user=user, team=link.team, action=Action.SHARE)
    else:
        require(user=user, team=link.team, action=Action.DELETE)
    if link.revoked_at is None:
        ShareLink.objects.filter(id=link.id).update(revoked_at=timezone.now())
        audit_record(
            actor=user, team=link.team, action="share_link.revoke", target=str(link), ip=ip
        )


# ---- runs trained elsewhere: created, fed and finished through the API ---------------------


EXTERNAL_WORKER = "external"  # the worker field of a run whose metrics arrive by the API


def run_create_external(
    *,
    user,
    project: Project,
    name: str,
    base_model: str,
    dataset: Dataset,
    method: str,
    method_config: dict,
    train_config: dict,
) -> Run:
    """A run trained outside PEFT Lab: no worker takes it; the API feeds its metrics."""
    _require_launcher(user=user, team=project.team)
    now = timezone.now()
    return Run.objects.create(
        project=project,
        name=name,
        created_by=user,
        base_model=base_model,
        dataset=dataset,
        method=method,
        method_config=method_config,
        train_config=train_config,
        total_steps=int(train_config.get("steps", 0)),
        external=True,
        status=RunStatus.RUNNING,
        worker=EXTERNAL_WORKER,
        started_at=now,
    )


MAX_INGEST_POINTS = 10_000


def metrics_ingest(*, user, run: Run, points: list[Point]) -> int:
    """Store a batch for an external run; a point already stored (run, key, step) is kept as
    it was, so a client that retries a batch changes nothing. Returns the points given."""
    _require_launcher(user=user, team=run.project.team)
    if not run.external:
        raise ValidationError("PEFT Lab's workers write this run's metrics; it takes no ingest.")
    if run.status != RunStatus.RUNNING:
        raise ValidationError(f"The run is {run.status}; metrics are taken while it runs.")
    if len(points) > MAX_INGEST_POINTS:
        raise ValidationError(f"At most {MAX_INGEST_POINTS:,} points per batch.")
    with transaction.atomic():
        # Under the run's row lock, as the workers' batches: two clients sending at once
        # store one batch after the other.
        Run.objects.select_for_update(no_key=True).filter(id=run.id).exists()
        _metric_points_insert(run_id=run.id, points=points)
        top = max((p.step for p in points), default=0)
        Run.objects.filter(id=run.id, step__lt=top).update(step=top, heartbeat_at=timezone.now())
    return len(points)


def run_finish_external(*, user, run: Run, status: str, summary: dict | None = None) -> Run:
    _require_launcher(user=user, team=run.project.team)
    if not run.external:
        raise ValidationError("Only a run trained elsewhere is finished through the API.")
    if status not in FINISHED_STATUSES:
        raise ValidationError("Finish with succeeded, failed or cancelled.")
    fields = {"status": status, "finished_at": timezone.now()}
    if summary is not None:
        fields["summary"] = summary
    if not Run.objects.filter(id=run.id, status=RunStatus.RUNNING).update(**fields):
        raise ValidationError(f"The run is already {run.status}.")
    run.refresh_from_db()
    return run


# ---- adapters trained elsewhere, uploaded as files -----------------------------------------

# A run needs a dataset; an uploaded adapter is attached to the built-in sample of its task
# unless the uploader picks one (the dataset an evaluation would use).
UPLOAD_DEFAULT_DATASETS = {"causal-lm": "sample-instructions", "seq-cls": "sample-sentiment"}


def adapter_upload_create(
    *,
    user,
    project: Project,
    name: str,
    base_model: str,
    config_file,
    weights_file,
    dataset: Dataset | None = None,
) -> Run:
    """An external run holding an uploaded adapter, queued for evaluation; ValidationError,
    storing nothing, when the files are refused. They are checked in a separate process
    (adapter_upload), and only what that check rebuilt is stored: peft_core's config and
    the re-serialised tensors."""
    from workers.tasks import train_run

    _require_launcher(user=user, team=project.team)
    if weights_file.size > settings.ADAPTER_MAX_BYTES:  # before reading it into memory
        raise ValidationError(too_large_message("adapter_model.safetensors"))
    adapter = validate_adapter(config_file.read(), weights_file.read(), base_model=base_model)
    dataset = _upload_dataset(task=adapter.task, dataset=dataset)
    with transaction.atomic():
        run = Run.objects.create(
            project=project,
            name=name,
            created_by=user,
            base_model=adapter.base_model,
            dataset=dataset,
            method=adapter.method,
            method_config=adapter.method_config,
            train_config={},
            external=True,
            log=f"Uploaded adapter: {adapter.method} on {adapter.base_model}, "
            f"{adapter.tensors:,} tensors ({adapter.parameters:,} parameters), "
            "checked and re-serialised by PEFT Lab; queued for evaluation on "
            f"{dataset.name}.",
        )
        _artifact_insert(
            run_id=run.id, kind="adapter", name="adapter_config.json", data=adapter.config_bytes
        )
        _artifact_insert(
            run_id=run.id,
            kind="adapter",
            name="adapter_model.safetensors",
            data=adapter.weights_bytes,
        )
        # A worker measures it as it measures a trained run: base and adapter eval loss on
        # the dataset's validation split, latency, parameters.
        train_run.delay_on_commit(run.id)
    return run


def _upload_dataset(*, task: str, dataset: Dataset | None) -> Dataset:
    if dataset is None:
        return Dataset.objects.get(team=None, builtin_key=UPLOAD_DEFAULT_DATASETS[task])
    if dataset.task != task:
        raise ValidationError(f"This adapter is for {task}; the dataset is {dataset.task}.")
    return dataset


# ---- playground -----------------------------------------------------------------------------

PLAYGROUND_MAX_RUNS = 4
PLAYGROUND_MAX_CHARS = 2000


def playground_prompt_create(*, user, runs: list[Run], text: str) -> PlaygroundPrompt:
    """Queue one prompt for the base model and up to PLAYGROUND_MAX_RUNS adapters of one team,
    one base model and one task; a worker answers it."""
    from workers.tasks import playground_answer

    text = text.strip()
    if not text:
        raise ValidationError("Type a prompt (or a sentence to classify).")
    if len(text) > PLAYGROUND_MAX_CHARS:
        raise ValidationError(f"A prompt holds at most {PLAYGROUND_MAX_CHARS} characters.")
    if not 1 <= len(runs) <= PLAYGROUND_MAX_RUNS:
        raise ValidationError(f"Pick between 1 and {PLAYGROUND_MAX_RUNS} runs.")
    teams = {run.project.team_id for run in runs}
    models_and_tasks = {(run.base_model, run.dataset.task) for run in runs}
    if len(teams) != 1:
        raise ValidationError("The runs must belong to one team.")
    if len(models_and_tasks) != 1:
        raise ValidationError("The runs must share one base model and task to answer side by side.")
    if any(run.status != RunStatus.SUCCEEDED for run in runs):
        raise ValidationError("Only finished, succeeded runs have an adapter to try.")
    team = runs[0].project.team
    require(user=user, team=team, action=Action.LAUNCH)
    base_model, task = models_and_tasks.pop()
    with transaction.atomic():
        prompt = PlaygroundPrompt.objects.create(
            team=team, created_by=user, base_model=base_model, task=task, text=text
        )
        prompt.runs.set(runs)
        playground_answer.delay_on_commit(prompt.id)
    return prompt


def playground_claim(*, prompt_id: int) -> bool:
    """Take a queued prompt for this worker; False for a duplicate delivery."""
    claimed = PlaygroundPrompt.objects.filter(id=prompt_id, status=PlaygroundStatus.QUEUED)
    return claimed.update(status=PlaygroundStatus.RUNNING) == 1


def playground_finish(*, prompt_id: int, answers: dict | None = None, error: str = "") -> None:
    PlaygroundPrompt.objects.filter(id=prompt_id, status=PlaygroundStatus.RUNNING).update(
        status=PlaygroundStatus.FAILED if error else PlaygroundStatus.DONE,
        answers=answers or {},
        error=error[:2000],
        finished_at=timezone.now(),
    )


def playground_vote(*, user, prompt: PlaygroundPrompt, run: Run | None) -> PlaygroundVote:
    """Record (or change) this person's pick of the best answer: a run, or None for the base."""
    require(user=user, team=prompt.team, action=Action.ANNOTATE)
    if prompt.status != PlaygroundStatus.DONE:
        raise ValidationError("Vote once the answers are in.")
    if run is not None and not prompt.runs.filter(id=run.id).exists():
        raise ValidationError("That run did not answer this prompt.")
    vote, _ = PlaygroundVote.objects.update_or_create(
        prompt=prompt, user=user, defaults={"run": run}
    )
    return vote
