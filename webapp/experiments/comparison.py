"""Reads behind the compare page: downsampled curves, the hyper-parameter table and the
trade-off table (method · trainable params · inference overhead · mergeable · quality ·
adapter size · peak memory), computed from the runs' own measurements."""

import csv
import io
from collections import defaultdict

import numpy as np

from webapp.experiments.downsample import json_values, minmax_indices
from webapp.experiments.models import MetricPoint, Run

CURVE_KEYS = ("train_loss", "eval_loss", "learning_rate", "eval_accuracy")
MAX_POINTS = 1000


def curves(runs: list[Run], *, max_points: int = MAX_POINTS) -> dict[int, dict[str, dict]]:
    """{run_id: {key: {"step", "value", "wall", "tokens"}}}, each at most ~max_points long."""
    rows = (
        MetricPoint.objects.filter(run__in=runs, key__in=(*CURVE_KEYS, "tokens"))
        .order_by("run_id", "key", "step")
        .values_list("run_id", "key", "step", "value", "wall_time")
    )
    raw: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run_id, key, step, value, wall in rows.iterator(chunk_size=10_000):
        raw[run_id][key].append((step, value, wall))
    return {run_id: _run_curves(series, max_points) for run_id, series in raw.items()}


def _run_curves(series: dict[str, list], max_points: int) -> dict[str, dict]:
    tokens = dict((step, value) for step, value, _ in series.get("tokens", []))
    start = min((points[0][2] for points in series.values() if points), default=0.0)
    result = {}
    for key in CURVE_KEYS:
        if not series.get(key):
            continue
        steps, values, walls = (np.array(column) for column in zip(*series[key], strict=True))
        index = minmax_indices(values, max_points)
        result[key] = {
            "step": steps[index].tolist(),
            "value": json_values(values[index]),
            "wall": (walls[index] - start).round(3).tolist(),
            "tokens": [tokens.get(int(step)) for step in steps[index]],
        }
    return result


def hyperparameters(runs: list[Run]) -> tuple[list[str], list[dict], set[str]]:
    """Columns, one row per run, and the columns whose values differ between runs."""
    rows = [
        {"method": run.method, "base_model": run.base_model, "dataset": run.dataset.name}
        | {f"{k}": v for k, v in run.method_config.items()}
        | {f"{k}": v for k, v in run.train_config.items()}
        for run in runs
    ]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    differing = {c for c in columns if len({repr(row.get(c)) for row in rows}) > 1}
    return columns, rows, differing


def quality(run: Run) -> tuple[str, float | None]:
    """The run's headline quality: accuracy for classification, else eval loss (lower is better)."""
    if run.summary.get("eval_accuracy") is not None:
        return "eval_accuracy", run.summary["eval_accuracy"]
    return "eval_loss", run.summary.get("eval_loss")


def tradeoff_rows(runs: list[Run]) -> list[dict]:
    rows = []
    for run in runs:
        profile, (metric, value) = run.profile, quality(run)
        rows.append(
            {
                "run": run.name,
                "method": run.method,
                "trainable_params": profile.get("trainable_params"),
                "trainable_percent": profile.get("trainable_percent"),
                "inference_overhead": profile.get("overhead"),
                "merged_overhead": _ratio(profile.get("merged_ms"), profile.get("base_ms")),
                "mergeable": profile.get("mergeable"),
                "quality_metric": metric,
                "quality": value,
                "base_quality": run.summary.get(f"base_{metric}"),
                "adapter_bytes": profile.get("adapter_bytes"),
                "peak_memory_mb": profile.get("peak_memory_mb"),
                "tokens_per_s": profile.get("tokens_per_s"),
                "status": run.status,
            }
        )
    return rows


def _ratio(numerator, denominator) -> float | None:
    return numerator / denominator if numerator and denominator else None


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value) -> str | float | int:
    """Text that a spreadsheet would run as a formula gets a leading quote; numbers stay."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def tradeoff_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: csv_cell(value) for key, value in row.items()})
    return buffer.getvalue()
