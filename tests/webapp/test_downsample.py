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
    from webapp.experiments.models import MetricPoint

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
        MetricPoint.objects.bulk_create(
            MetricPoint(run=run, key=key, step=s, value=v, wall_time=0.0)
            for s, v in enumerate(values)
        )
    series = series_downsampled(run_ids=[run.id], keys=("up_first", "down_first", "absent"))
    assert set(series) == {(run.id, "up_first"), (run.id, "down_first")}
    for key, spikes in expected.items():
        steps, values, _ = series[(run.id, key)]
        assert len(steps) <= 1000 and list(steps) == sorted(set(steps))
        assert steps[0] == 0 and steps[-1] == N - 1
        kept = dict(zip(steps.tolist(), values.tolist(), strict=True))
        assert all(kept.get(position) == value for position, value in spikes.items()), key
