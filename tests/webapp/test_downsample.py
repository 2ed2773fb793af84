"""Server-side downsampling keeps each bucket's extremes: a one-point spike survives."""

import numpy as np
import pytest

from webapp.experiments.downsample import downsample_minmax

N = 100_000


@pytest.mark.parametrize("position", [0, 1, 777, 50_001, N - 2, N - 1])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_one_point_spike_in_100k_points_survives(position, sign):
    rng = np.random.default_rng(0)
    values = 2.0 + 0.01 * rng.standard_normal(N)
    values[position] = 2.0 + sign * 50.0
    steps, kept = downsample_minmax(np.arange(N), values)
    assert len(kept) <= 1000
    assert 2.0 + sign * 50.0 in kept
    assert steps[kept.index(2.0 + sign * 50.0)] == position


def test_keeps_order_ends_and_short_series():
    steps, values = downsample_minmax(np.arange(N), np.sin(np.arange(N) / 1000.0))
    assert steps[0] == 0 and steps[-1] == N - 1
    assert steps == sorted(steps)
    assert downsample_minmax([1, 2, 3], [0.5, 0.25, 0.125]) == ([1, 2, 3], [0.5, 0.25, 0.125])


def test_envelope_matches_the_full_series():
    values = np.random.default_rng(1).standard_normal(N)
    _, kept = downsample_minmax(np.arange(N), values, max_points=200)
    assert max(kept) == values.max() and min(kept) == values.min()
    assert len(kept) <= 200


def test_non_finite_values_become_json_null_and_do_not_hide_the_extremes():
    import json

    from webapp.experiments.downsample import downsample_minmax

    # A NaN inside a bucket must not mask its real maximum (3.0); the last point is NaN.
    values = [1.0, float("nan"), 3.0] + [2.0] * 5000 + [float("nan")]
    steps, kept = downsample_minmax(list(range(len(values))), values, max_points=100)
    text = json.dumps(kept, allow_nan=False)  # raises on NaN or Infinity
    assert "null" in text
    assert 3.0 in kept and len(kept) <= 100


@pytest.mark.django_db
def test_stored_spikes_survive_the_databases_downsampling(make_run):
    """The same spikes, read back through series_downsampled: numpy on SQLite, the database's
    own buckets on PostgreSQL."""
    from webapp.experiments.downsample import series_downsampled

    run = make_run()
    positions = [0, 1, 777, 50_001, N - 2, N - 1]
    rng = np.random.default_rng(0)
    expected = {}
    for key, first_sign in (("up_first", 1.0), ("down_first", -1.0)):
        values = 2.0 + 0.01 * rng.standard_normal(N)
        signs = [first_sign * (-1) ** i for i in range(len(positions))]  # alternating
        for position, sign in zip(positions, signs, strict=True):
            values[position] = 2.0 + sign * 50.0
        expected[key] = {position: values[position] for position in positions}
        _store(run, key, values)
    series = series_downsampled(run_ids=[run.id], keys=("up_first", "down_first", "absent"))
    assert set(series) == {(run.id, "up_first"), (run.id, "down_first")}
    for key, spikes in expected.items():
        steps, values, _ = series[(run.id, key)]
        assert len(steps) <= 1000 and list(steps) == sorted(set(steps))
        assert steps[0] == 0 and steps[-1] == N - 1
        kept = dict(zip(steps.tolist(), values.tolist(), strict=True))
        assert all(kept.get(position) == value for position, value in spikes.items()), key


def _store(run, key, values, steps=None, batch=1000):
    """Stored the way the workers store them: batches through the service's insert, which on
    PostgreSQL also keeps the series' rollups."""
    from webapp.experiments.metrics import Point, _metric_points_insert

    steps = range(len(values)) if steps is None else steps
    points = [
        Point(key, int(s), float(v), float(s) / 10) for s, v in zip(steps, values, strict=True)
    ]
    for start in range(0, len(points), batch):
        _metric_points_insert(run_id=run.id, points=points[start : start + batch])


def _rollups_from_points(run_id: int) -> dict:
    """What the rollups must hold, computed in Python from the stored points."""
    from webapp.experiments.models import ROLLUP_WIDTHS, MetricPoint

    expected: dict[tuple, dict] = {}
    for key, step, value, wall in MetricPoint.objects.filter(run_id=run_id).values_list(
        "key", "step", "value", "wall_time"
    ):
        for width in ROLLUP_WIDTHS:
            row = expected.setdefault(
                (key, width, step // width),
                {"count": 0, "first": None, "last": None, "low": None, "high": None},
            )
            row["count"] += 1
            point = (step, value, wall)
            row["first"] = min(row["first"] or point, point)
            row["last"] = max(row["last"] or point, point)
            row["low"] = min(row["low"] or point, point, key=lambda p: (p[1], p[0]))
            row["high"] = max(row["high"] or point, point, key=lambda p: (p[1], p[0]))
    return expected


def _rollups_stored(run_id: int) -> dict:
    from webapp.experiments.models import MetricRollup

    return {
        (r.key, r.width, r.bucket): {
            "count": r.count,
            "first": (r.first_step, r.first_value, r.first_wall),
            "last": (r.last_step, r.last_value, r.last_wall),
            "low": (r.low_step, r.low_value, r.low_wall),
            "high": (r.high_step, r.high_value, r.high_wall),
        }
        for r in MetricRollup.objects.filter(run_id=run_id)
    }


@pytest.mark.django_db
def test_rollups_match_the_points_after_resent_overlapping_and_shuffled_batches(make_run):
    """Batches arrive out of order, overlap, repeat (a resumed run sends steps again) and carry
    ties: the rollups still equal a summary computed from the stored points, and a repeated
    point is counted once."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("rollups are kept on PostgreSQL; CI runs this there")
    run = make_run()
    rng = np.random.default_rng(7)
    values = np.round(rng.standard_normal(5000), 1)  # rounded: many equal values (ties)
    steps = np.arange(5000)
    order = rng.permutation(50)
    for chunk in order:  # 50 batches of 100 steps, shuffled
        part = slice(chunk * 100, chunk * 100 + 100)
        _store(run, "train_loss", values[part], steps[part])
    _store(run, "train_loss", values[1200:3400], steps[1200:3400], batch=700)  # resent, overlapping
    _store(run, "eval_loss", values[::500], steps[::500])
    expected = _rollups_from_points(run.id)
    assert sum(row["count"] for (k, w, _), row in expected.items() if w == 16) == 5000 + 10
    assert _rollups_stored(run.id) == expected


@pytest.mark.django_db
@pytest.mark.parametrize("length", [900, 1001, 20_000, 300_000])
def test_long_series_read_through_rollups_keep_ends_and_extremes(make_run, length):
    """Every length the reader distinguishes (points, each rollup width, and longer than the
    coarsest covers in max_points rows): first and last points, the global extremes, and a
    one-point spike in the middle survive, at most ~max_points points, in step order."""
    from webapp.experiments.downsample import series_downsampled

    run = make_run()
    rng = np.random.default_rng(length)
    values = 2.0 + 0.01 * rng.standard_normal(length)
    values[length // 2 + 3] = 60.0
    values[length // 3] = -60.0
    _store(run, "train_loss", values, batch=5000)
    steps, kept, walls = series_downsampled(run_ids=[run.id], keys=("train_loss",))[
        (run.id, "train_loss")
    ]
    assert len(steps) <= min(length, 1000)
    assert list(steps) == sorted(set(steps.tolist()))
    assert steps[0] == 0 and steps[-1] == length - 1
    assert kept[0] == values[0] and kept[-1] == values[-1]
    by_step = dict(zip(steps.tolist(), kept.tolist(), strict=True))
    assert by_step[length // 2 + 3] == 60.0 and by_step[length // 3] == -60.0
    assert all(by_step[s] == values[s] for s in by_step)  # real points, not averages
    assert np.allclose(walls, steps / 10)
    if length > 1000:
        assert len(steps) > 100  # a chart, not a handful of points


@pytest.mark.django_db
def test_appending_batches_skip_the_staging_table_and_repeats_take_it(make_run):
    """Training appends: such a batch is copied straight into the table. A batch that repeats
    a stored step, or holds one twice, goes through the staging table, which skips what is
    stored. Either way the rollups equal the points' summary."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from webapp.experiments.models import MetricPoint

    if connection.vendor != "postgresql":
        pytest.skip("the COPY paths are PostgreSQL's; CI runs this there")
    run = make_run()
    values = np.arange(3000, dtype=float) % 17

    def staged(steps, batch_values) -> bool:
        with CaptureQueriesContext(connection) as queries:
            _store(run, "train_loss", batch_values, steps, batch=len(steps))
        return any("metric_staging" in query["sql"] for query in queries)

    assert not staged(range(0, 1000), values[:1000])
    assert not staged(range(1000, 2000), values[1000:2000])
    assert staged(range(1500, 2500), values[1500:2500])  # repeats 1500-1999
    assert staged([2600, 2600, 2601], [1.0, 2.0, 3.0])  # step 2600 twice in one batch
    assert not staged(range(2700, 3000), values[2700:3000])
    stored = dict(MetricPoint.objects.filter(run=run).values_list("step", "value"))
    assert len(stored) == 2500 + 2 + 300
    assert stored[1700] == values[1700] and stored[2600] == 1.0  # the first one stays
    assert _rollups_stored(run.id) == _rollups_from_points(run.id)
