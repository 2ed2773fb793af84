"""Min/max downsampling: at most ~`max_points` per series, and every spike survives.

The series is cut into equal-count buckets; each bucket keeps its minimum and its maximum
(in step order), so a one-point spike anywhere is still drawn, unlike plain striding or
averaging. First and last points are always kept.
"""

import numpy as np

DEFAULT_MAX_POINTS = 1000


def minmax_indices(values: np.ndarray, max_points: int = DEFAULT_MAX_POINTS) -> np.ndarray:
    """Sorted indices to keep: all of them when few, else first, last and each bucket's extremes."""
    n = len(values)
    if n <= max_points:
        return np.arange(n)
    buckets = max(1, (max_points - 2) // 2)
    edges = np.linspace(1, n - 1, buckets + 1).astype(int)
    keep = {0, n - 1}
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        chunk = values[start:stop]
        if len(chunk) and not np.isnan(chunk).all():
            keep.update((start + int(np.nanargmin(chunk)), start + int(np.nanargmax(chunk))))
    return np.array(sorted(keep))


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
