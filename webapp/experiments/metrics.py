"""Metric points: the write half (batched COPY with the rollups kept per batch) beside
`downsample.py`, the read half that draws curves from those rollups.

A worker's batch (`metrics_record`) is checked against its fence under the run's row lock;
a run trained elsewhere is fed through the API (`metrics_ingest`). Both are idempotent on
(run, key, step): a batch sent twice stores its points once.
"""

import csv
import io
import math
import weakref
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.utils import timezone

from webapp.accounts.permissions import Action, require
from webapp.experiments.leases import StaleFenceError, owned
from webapp.experiments.models import ROLLUP_WIDTHS, MetricPoint, Run, RunStatus


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
        if not owned(run_id, fence).select_for_update(no_key=True).exists():
            raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
        return _metric_points_insert(run_id=run_id, points=points)


def _metric_points_insert(*, run_id: int, points: list[Point]) -> int:
    """Store the finite points, skipping those already stored; returns how many were finite.

    A non-finite value is left out: JSON has no NaN, SQLite stores none, and the training
    loop already fails the run when its loss stops being finite. PostgreSQL takes the batch
    in one COPY into a temporary table and one INSERT … ON CONFLICT DO NOTHING from it.
    """
    finite = [p for p in points if math.isfinite(p.value) and math.isfinite(p.wall_time)]
    _metric_keys_check(run_id=run_id, points=finite)
    if connection.vendor == "postgresql":
        _metric_points_copy(run_id=run_id, points=finite)
    else:
        rows = [
            MetricPoint(run_id=run_id, key=p.key, step=p.step, value=p.value, wall_time=p.wall_time)
            for p in finite
        ]
        MetricPoint.objects.bulk_create(rows, batch_size=1000, ignore_conflicts=True)
    return len(finite)


class MetricKeysOverCap(ValidationError):
    """A batch that would give its run more distinct metric keys than METRIC_KEYS_PER_RUN."""


# The batch's keys that the run has no point of yet: one index probe each (the unique
# (run, key, step) index), however long the run's series are.
KEYS_NOT_STORED = """WITH batch (key) AS (VALUES {rows})
SELECT key FROM batch WHERE NOT EXISTS (
    SELECT 1 FROM experiments_metricpoint AS p WHERE p.run_id = %s AND p.key = batch.key
)"""


def _metric_keys_check(*, run_id: int, points: list[Point]) -> None:
    """Refuse the whole batch if it would give the run more than METRIC_KEYS_PER_RUN distinct
    keys. The caller holds the run's row lock, so two batches are counted one after the
    other and cannot pass the cap together. Only a batch that brings new keys counts the
    stored ones (one index probe per key, at most cap + 1)."""
    cap = settings.METRIC_KEYS_PER_RUN
    keys = list(dict.fromkeys(p.key for p in points))
    if len(keys) > cap:
        raise MetricKeysOverCap(_over_cap(cap, stored=None, new=len(keys)))
    if not keys:
        return
    with connection.cursor() as cursor:
        cursor.execute(
            KEYS_NOT_STORED.format(rows=", ".join(["(%s)"] * len(keys))), [*keys, run_id]
        )
        new = len(cursor.fetchall())
    if not new:
        return
    stored = len(metric_keys_stored(run_id=run_id, limit=cap + 1))
    if stored + new > cap:
        raise MetricKeysOverCap(_over_cap(cap, stored=stored, new=new))


def _over_cap(cap: int, *, stored: int | None, new: int) -> str:
    has = "" if stored is None else f"the run has {stored:,} and "
    return (
        f"A run takes at most {cap:,} distinct metric keys "
        f"(PEFTLAB_MAX_METRIC_KEYS_PER_RUN); {has}this batch brings {new:,} new ones. "
        "Nothing of the batch was stored."
    )


# The run's distinct keys in order from `after` on, read as a loose index scan: each key is
# one probe of the unique (run, key, step) index for the next key up, so listing N keys
# costs N probes whether the run holds 10 points or 10 million (a DISTINCT would read them
# all). The LIMIT stops the recursion.
RUN_KEYS = """WITH RECURSIVE run_keys (key) AS (
    SELECT min(key) FROM experiments_metricpoint WHERE run_id = %s AND key > %s
    UNION ALL
    SELECT (SELECT min(p.key) FROM experiments_metricpoint AS p
            WHERE p.run_id = %s AND p.key > run_keys.key)
    FROM run_keys WHERE run_keys.key IS NOT NULL
)
SELECT key FROM run_keys WHERE key IS NOT NULL LIMIT %s"""


def metric_keys_stored(*, run_id: int, after: str = "", limit: int) -> list[str]:
    """Up to `limit` of the run's metric keys, in the database's order, each after `after`."""
    with connection.cursor() as cursor:
        cursor.execute(RUN_KEYS, [run_id, after, run_id, limit])
        return [key for (key,) in cursor.fetchall()]


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


MAX_INGEST_POINTS = 10_000


def metrics_ingest(*, user, run: Run, points: list[Point]) -> int:
    """Store a batch for an external run; a point already stored (run, key, step) is kept as
    it was, so a client that retries a batch changes nothing. Returns the points given.
    MetricKeysOverCap (a ValidationError) when the batch would pass the run's key cap."""
    require(user=user, team=run.project.team, action=Action.LAUNCH)
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
