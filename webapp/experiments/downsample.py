"""Min/max downsampling: at most ~`max_points` per series, and every spike survives.

The series is cut into buckets; each bucket keeps its minimum and its maximum (in step
order), so a one-point spike anywhere is still drawn, unlike plain striding or averaging.
First and last points are always kept. In numpy the buckets hold equal counts of points; on
PostgreSQL (`series_downsampled`) they span equal ranges of steps and are folded from the
series' rollups (MetricRollup), so a 100 000-point series reads ~800 rows, not 100 000.
"""

import io
from collections import defaultdict

import numpy as np
from django.db import connection

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
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    if finite.all():
        return values.tolist()
    return [v if ok else None for v, ok in zip(values.tolist(), finite.tolist(), strict=True)]


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


# On PostgreSQL every series has rollups (MetricRollup, kept up to date by each stored batch):
# per bucket of 16, 128 and 1024 steps its count, first, last, lowest and highest point. The
# coarsest say how long each series is; a short one is read point by point, a long one from
# the finest rollups that give at most ~2 x max_points rows, and numpy folds those into the
# chart's buckets. Reading 20 series of 100 000 points is ~800 rows each, not 100 000. Rows
# come through COPY … (FORMAT binary), all float8, straight into a numpy array: parsing
# 15 000 rows of 12 numbers as text cost more than PostgreSQL's whole query.
SERIES_SPANS_SQL = """
SELECT run_id, key, sum(count), min(first_step), max(last_step)
FROM experiments_metricrollup
WHERE run_id = ANY(%(run_ids)s) AND key = ANY(%(keys)s) AND width = %(width)s
GROUP BY run_id, key
"""
# LATERAL … LIMIT: each short series is an index range read; a plain join lets PostgreSQL
# (which cannot know how short they are) hash-join a scan of the whole table instead.
SERIES_POINTS_SQL = """
SELECT s.i::float8, p.step::float8, p.value, p.wall_time
FROM unnest(%(run_ids)s::bigint[], %(keys)s::varchar[]) WITH ORDINALITY AS s (run_id, key, i)
CROSS JOIN LATERAL (
    SELECT step, value, wall_time FROM experiments_metricpoint
    WHERE run_id = s.run_id AND key = s.key ORDER BY step LIMIT %(limit)s
) AS p
ORDER BY s.i, p.step
"""
SERIES_ROLLUPS_SQL = """
SELECT s.i::float8, r.first_step::float8, r.first_value, r.first_wall,
    r.last_step::float8, r.last_value, r.last_wall, r.low_step::float8, r.low_value, r.low_wall,
    r.high_step::float8, r.high_value, r.high_wall
FROM unnest(%(run_ids)s::bigint[], %(keys)s::varchar[], %(widths)s::integer[])
    WITH ORDINALITY AS s (run_id, key, width, i)
JOIN experiments_metricrollup AS r ON r.run_id = s.run_id AND r.key = s.key AND r.width = s.width
ORDER BY s.i, r.bucket
"""


def _series_by_sql(run_ids, keys, max_points, *, fold=True) -> dict[tuple[int, str], Series]:
    from webapp.experiments.models import ROLLUP_WIDTHS

    with connection.cursor() as cursor:
        cursor.execute(
            SERIES_SPANS_SQL,
            {"run_ids": list(run_ids), "keys": list(keys), "width": max(ROLLUP_WIDTHS)},
        )
        spans = {(run_id, key): (n, lo, hi) for run_id, key, n, lo, hi in cursor.fetchall()}
        short = sorted(series_id for series_id, (n, _, _) in spans.items() if n <= max_points)
        long = sorted(series_id for series_id, (n, _, _) in spans.items() if n > max_points)
        widths = [
            _finest_width(spans[i][2] - spans[i][1] + 1, max_points, ROLLUP_WIDTHS) for i in long
        ]
        points = _copy_float_rows(
            cursor, SERIES_POINTS_SQL, _columns(short) | {"limit": max_points}, 4
        )
        rollups = _copy_float_rows(
            cursor, SERIES_ROLLUPS_SQL, _columns(long) | {"widths": widths}, 13
        )
    result = {}
    for series_id, rows in zip(short, _by_series(points, len(short)), strict=True):
        result[series_id] = (rows[:, 0].astype(np.int64), rows[:, 1], rows[:, 2])
    for series_id, rows in zip(long, _by_series(rollups, len(long)), strict=True):
        result[series_id] = _fold_rollups(rows, max_points) if fold else _bucket_ends(rows)
    return result


def _columns(series_ids: list[tuple[int, str]]) -> dict[str, list]:
    return {"run_ids": [r for r, _ in series_ids], "keys": [k for _, k in series_ids]}


def _copy_float_rows(cursor, sql: str, params: dict, width: int) -> np.ndarray:
    """The query's rows, `width` non-null float8 columns each, as an (n, width) array, read
    through COPY's binary format: a header, then per row a field count and, per field, its
    length and 8 big-endian bytes; a trailer of -1."""
    if not params["run_ids"]:
        return np.empty((0, width))
    buffer = io.BytesIO()
    query = cursor.mogrify(sql, params).decode()
    cursor.copy_expert(f"COPY ({query}) TO STDOUT WITH (FORMAT binary)", buffer)
    data = buffer.getbuffer()
    if bytes(data[:11]) != b"PGCOPY\n\xff\r\n\x00":
        raise ValueError("not a binary COPY stream")
    body = 19 + int.from_bytes(data[15:19], "big")  # after the header's extension area
    row = np.dtype(
        [("fields", ">i2")]
        + [(f"{p}{i}", f">{t}") for i in range(width) for p, t in (("n", "i4"), ("v", "f8"))]
    )
    rows = np.frombuffer(data[body : len(data) - 2], dtype=row)
    if (rows["fields"] != width).any() or any((rows[f"n{i}"] != 8).any() for i in range(width)):
        raise ValueError("binary COPY rows are not all float8 and non-null")
    return np.stack([rows[f"v{i}"].astype(float) for i in range(width)], axis=1)


def _by_series(rows: np.ndarray, count: int) -> list[np.ndarray]:
    """Rows split by their first column, the series' ordinal (1 … count, rows in order)."""
    starts = np.searchsorted(rows[:, 0], np.arange(1, count + 2))
    return [rows[starts[i] : starts[i + 1], 1:] for i in range(count)]


def _finest_width(span: int, max_points: int, widths: tuple[int, ...]) -> int:
    """The finest rollup width with at most 2 x max_points buckets over `span` steps: enough
    rows to fill the chart's max_points / 2 buckets, few enough to read fast."""
    return next((w for w in sorted(widths) if span / w <= 2 * max_points), max(widths))


def _fold_rollups(rows: np.ndarray, max_points: int) -> Series:
    """One series from its rollup rows (first, last, low, high; each step, value, wall), in
    bucket order: the first and last points, and each chart bucket's lowest and highest,
    the chart's buckets splitting the series' step range evenly."""
    first, last, low, high = rows[:, 0:3], rows[:, 3:6], rows[:, 6:9], rows[:, 9:12]
    lo, hi = first[0, 0], last[-1, 0]
    buckets = _bucket_count(max_points)
    # A rollup bucket goes whole to the chart bucket its first point falls in.
    group = ((first[:, 0] - lo) * buckets // (hi - lo + 1)).astype(np.int64)
    # Per group: the lowest value (ties: the earliest step), the highest (ties: the latest),
    # as PostgreSQL's min/max of ARRAY[value, step, wall] pick them when it fills the rollups.
    by_low = np.lexsort((low[:, 0], low[:, 1], group))
    by_high = np.lexsort((high[:, 0], high[:, 1], group))
    starts = np.flatnonzero(np.r_[True, group[by_low][1:] != group[by_low][:-1]])
    ends = np.r_[starts[1:], len(group)] - 1
    return _points_by_step(
        np.concatenate([first[:1], last[-1:], low[by_low[starts]], high[by_high[ends]]])
    )


def _bucket_ends(rows: np.ndarray) -> Series:
    """The first and the last point of every rollup bucket: for a counter (tokens seen), a
    chain of exact points to interpolate between."""
    return _points_by_step(np.concatenate([rows[:, 0:3], rows[:, 3:6]]))


def _points_by_step(points: np.ndarray) -> Series:
    steps, unique = np.unique(points[:, 0], return_index=True)
    return steps.astype(np.int64), points[unique, 1], points[unique, 2]


def step_anchors(*, run_ids: list[int], key: str) -> dict[int, Series]:
    """{run_id: (steps, values, walls)} of one key, for interpolating it at other steps:
    every point of a short series; the first and last point of each rollup bucket of a long
    one on PostgreSQL (elsewhere every point)."""
    if not run_ids:
        return {}
    if connection.vendor == "postgresql":
        series = _series_by_sql(run_ids, (key,), DEFAULT_MAX_POINTS, fold=False)
    else:
        series = _series_by_numpy(run_ids, (key,), max_points=10**12)
    return {run_id: points for (run_id, _), points in series.items()}
