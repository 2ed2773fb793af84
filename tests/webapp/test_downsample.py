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
