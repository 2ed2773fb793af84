"""Min/max downsampling: at most ~`max_points` per series, and every spike survives.

The series is cut into buckets; each bucket keeps its minimum and its maximum (in step
order), so a one-point spike anywhere is still drawn, unlike plain striding or averaging.
First and last points are always kept. In numpy the buckets hold equal counts of points; on
PostgreSQL (`series_downsampled`) they span equal ranges of steps and the database keeps the
extremes, so a 100 000-point series sends ~1000 rows, not 100 000, to Python.
"""

from collections import defaultdict

import numpy as np
from django.db import connection, transaction

DEFAULT_MAX_POINTS = 1000


def minmax_indices(values: np.ndarray, max_points: int = DEFAULT_MAX_POINTS) -> np.ndarray:
    """Sorted indices to keep: all of them when few, else first, last and each bucket's extremes."""
    n = len(values)
    if n <= max_points:
        return np.arange(n)
    buckets = _bucket_count(max_points)
    edges = np.linspace(1, n - 1, buckets + 1).astype(int)
    keep = {0, n - 1}
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        chunk = values[start:stop]
        if len(chunk) and not np.isnan(chunk).all():
            keep.update((start + int(np.nanargmin(chunk)), start + int(np.nanargmax(chunk))))
    return np.array(sorted(keep))


def _bucket_count(max_points: int) -> int:
    """Two points per bucket, plus the first and the last, stay within max_points."""
    return max(1, (max_points - 2) // 2)


def json_values(values: np.ndarray) -> list[float | None]:
    """Floats for JSON: a NaN or infinite loss becomes null (a gap in the chart), since JSON
    has no NaN and a browser's JSON.parse refuses one."""
    return [float(v) if np.isfinite(v) else None for v in values]


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and np.isfinite(value) else None


def downsample_minmax(
    steps: list[int] | np.ndarray,
    values: list[float] | np.ndarray,
    max_points: int = DEFAULT_MAX_POINTS,
) -> tuple[list[int], list[float]]:
    x, y = np.asarray(steps), np.asarray(values, dtype=float)
    index = minmax_indices(y, max_points)
    return x[index].tolist(), json_values(y[index])


# ---- many series at once, read from the database ---------------------------------------------

Series = tuple[np.ndarray, np.ndarray, np.ndarray]  # steps, values, wall times; by step


def series_downsampled(
    *, run_ids: list[int], keys: tuple[str, ...], max_points: int = DEFAULT_MAX_POINTS
) -> dict[tuple[int, str], Series]:
    """{(run_id, key): (steps, values, walls)} of every stored series, each at most ~max_points
    long, first and last points and each bucket's extremes kept. PostgreSQL picks the points
    itself, so only they cross the wire; elsewhere every point is read and numpy picks."""
    if not run_ids or not keys:
        return {}
    if connection.vendor == "postgresql":
        return _series_by_sql(run_ids, keys, max_points)
    return _series_by_numpy(run_ids, keys, max_points)


def _series_by_numpy(run_ids, keys, max_points) -> dict[tuple[int, str], Series]:
    from webapp.experiments.models import MetricPoint

    rows = (
        MetricPoint.objects.filter(run_id__in=run_ids, key__in=keys)
        .order_by("run_id", "key", "step")
        .values_list("run_id", "key", "step", "value", "wall_time")
    )
    raw: dict[tuple[int, str], list] = defaultdict(list)
    for run_id, key, *point in rows.iterator(chunk_size=10_000):
        raw[(run_id, key)].append(point)
    result = {}
    for series_id, points in raw.items():
        steps, values, walls = (np.array(column) for column in zip(*points, strict=True))
        index = minmax_indices(values.astype(float), max_points)
        result[series_id] = (steps[index], values[index], walls[index])
    return result


# Buckets split each series' step range evenly (PostgreSQL knows its first and last step from
# two index probes, not its length). min()/max() of ARRAY[value, step, wall] pick a bucket's
# extreme point in one pass, no sort: arrays compare element by element.
SERIES_SQL = """
WITH series AS (
    SELECT r.run_id, k.key, head.step AS lo, head.value AS lo_value, head.wall_time AS lo_wall,
           tail.step AS hi, tail.value AS hi_value, tail.wall_time AS hi_wall
    FROM unnest(%(run_ids)s::bigint[]) AS r (run_id)
    CROSS JOIN unnest(%(keys)s::varchar[]) AS k (key)
    CROSS JOIN LATERAL (
        SELECT step, value, wall_time FROM experiments_metricpoint
        WHERE run_id = r.run_id AND key = k.key ORDER BY step LIMIT 1
    ) AS head
    CROSS JOIN LATERAL (
        SELECT step, value, wall_time FROM experiments_metricpoint
        WHERE run_id = r.run_id AND key = k.key ORDER BY step DESC LIMIT 1
    ) AS tail
), extremes AS (
    SELECT p.run_id, p.key,
           min(ARRAY[p.value, p.step, p.wall_time]) AS low,
           max(ARRAY[p.value, p.step, p.wall_time]) AS high
    FROM series AS s
    JOIN experiments_metricpoint AS p ON p.run_id = s.run_id AND p.key = s.key
    GROUP BY p.run_id, p.key, (p.step - s.lo)::bigint * %(buckets)s / (s.hi - s.lo + 1)
)
SELECT run_id, key, point[2]::integer, point[1], point[3]
FROM extremes CROSS JOIN LATERAL (VALUES (low), (high)) AS v (point)
UNION ALL SELECT run_id, key, lo, lo_value, lo_wall FROM series
UNION ALL SELECT run_id, key, hi, hi_value, hi_wall FROM series
"""


def _series_by_sql(run_ids, keys, max_points) -> dict[tuple[int, str], Series]:
    params = {"run_ids": list(run_ids), "keys": list(keys), "buckets": _bucket_count(max_points)}
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL work_mem = '64MB'")  # the buckets' hash table stays in memory
        cursor.execute(SERIES_SQL, params)
        rows = cursor.fetchall()
    points: dict[tuple[int, str], dict[int, tuple]] = defaultdict(dict)
    for run_id, key, step, value, wall in rows:
        points[(run_id, key)][step] = (value, wall)
    result = {}
    for series_id, by_step in points.items():
        steps = np.array(sorted(by_step))
        values, walls = (np.array(column) for column in zip(*map(by_step.get, steps), strict=True))
        result[series_id] = (steps, values, walls)
    return result
