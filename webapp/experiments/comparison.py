"""Reads behind the compare page: downsampled curves, the hyper-parameter table and the
trade-off table (method · trainable params · inference overhead · mergeable · quality ·
adapter size · peak memory), computed from the runs' own measurements."""

import csv
import io
from collections import defaultdict

import numpy as np
from django.core.cache import cache

from peft_core.registry import whole_model
from webapp.experiments.displayed_metrics import COMPARE_KEYS
from webapp.experiments.downsample import Series, json_values, series_downsampled, step_anchors
from webapp.experiments.lineage import LABELS, lineage_keys
from webapp.experiments.models import Run

MAX_POINTS = 1000


def curves(runs: list[Run], *, max_points: int = MAX_POINTS) -> dict[int, dict[str, dict]]:
    """{run_id: {key: {"step", "value", "wall", "tokens"}}}, each at most ~max_points long.

    A finished run's points never change (writes need a running run), so its curves are
    cached under its id and end time: a page of 20 finished 100 000-step runs reads no points.
    """
    keys = {run.id: _cache_key(run, max_points) for run in runs}
    cached = cache.get_many([key for key in keys.values() if key])
    result = {run_id: cached[key] for run_id, key in keys.items() if key in cached}
    computed = _curves([run_id for run_id in keys if run_id not in result], max_points)
    cache.set_many(
        {keys[run_id]: value for run_id, value in computed.items() if keys[run_id]},
        timeout=CACHE_SECONDS,
    )
    result |= computed
    return {run.id: result[run.id] for run in runs if result.get(run.id)}


CACHE_SECONDS = 24 * 3600


def _cache_key(run: Run, max_points: int) -> str | None:
    if not run.is_finished or run.finished_at is None:
        return None
    return f"curves:v2:{run.id}:{run.finished_at.timestamp()}:{max_points}"


def _curves(run_ids: list[int], max_points: int) -> dict[int, dict[str, dict]]:
    series = series_downsampled(run_ids=run_ids, keys=COMPARE_KEYS, max_points=max_points)
    by_run: dict[int, dict[str, Series]] = defaultdict(dict)
    for (run_id, key), points in series.items():
        by_run[run_id][key] = points
    tokens = step_anchors(run_ids=run_ids, key="tokens")
    return {run_id: _run_curves(by_run[run_id], tokens.get(run_id)) for run_id in run_ids}


def _run_curves(series: dict[str, Series], tokens: Series | None) -> dict[str, dict]:
    """The curves of one run, wall times from its first point, tokens seen at each step.

    Tokens are a counter, read as anchors (every point of a short series, the ends of each
    rollup bucket of a long one): exact at an anchor, interpolated between two (at most one
    bucket, 128 steps of a 100 000-step run, apart), none outside the counted steps."""
    start = min((walls[0] for _, _, walls in series.values()), default=0.0)
    result = {}
    for key in COMPARE_KEYS:
        if key not in series:
            continue
        steps, values, walls = series[key]
        result[key] = {
            "step": steps.tolist(),
            "value": json_values(values),
            "wall": (walls - start).round(3).tolist(),
            "tokens": _tokens_at(steps, tokens),
        }
    return result


def _tokens_at(steps: np.ndarray, tokens: Series | None) -> list[float | None]:
    if tokens is None or not len(steps):
        return [None] * len(steps)
    anchors, counts, _ = tokens
    inside = (steps >= anchors[0]) & (steps <= anchors[-1])
    return json_values(np.where(inside, np.interp(steps, anchors, counts), np.nan))


# A run trained elsewhere may bring a config of thousands of settings: the table keeps this
# many columns, those that differ between the runs first.
MAX_HPARAM_COLUMNS = 200


def hyperparameters(runs: list[Run]) -> tuple[list[str], list[dict], set[str]]:
    """Columns, one row per run, and the columns whose values differ between runs. Nested
    settings (a run trained elsewhere) read as dotted columns ("lora.r"); a run without a
    dataset has no "dataset" cell (the page shows "—")."""
    rows = [
        {"method": run.method, "base_model": run.base_model}
        | ({"dataset": run.dataset.name} if run.dataset_id else {})
        | dict(flat_settings(run.method_config))
        | dict(flat_settings(run.train_config))
        for run in runs
    ]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    differs = differing(columns, rows)
    if len(columns) > MAX_HPARAM_COLUMNS:
        columns = sorted(columns, key=lambda c: c not in differs)[:MAX_HPARAM_COLUMNS]
        rows = [{c: row[c] for c in columns if c in row} for row in rows]
    return columns, rows, differs & set(columns)


def flat_settings(config: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every setting: {"lora": {"r": 8}} → [("lora.r", 8)]. Lists and
    scalars are values; an empty object is one value ({})."""
    items: list[tuple[str, object]] = []
    for key, value in config.items():
        if isinstance(value, dict) and value:
            items += flat_settings(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def differing(columns: list[str], rows: list[dict]) -> set[str]:
    """The columns whose values are not the same in every row (a missing value differs)."""
    return {c for c in columns if len({repr(row.get(c)) for row in rows}) > 1}


def lineage_rows(runs: list[Run]) -> list[tuple[str, list, bool]]:
    """(label, one value per run, differs) per lineage key any run recorded; the table the
    compare page shows transposed from the hyper-parameters', as its values are long."""
    rows = [run.lineage for run in runs]
    keys = lineage_keys(rows)
    differs = differing(keys, rows)
    return [(LABELS.get(k, k), [row.get(k, "—") for row in rows], k in differs) for k in keys]


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
                "overhead_spread": profile.get("overhead_spread"),
                "merged_overhead": profile.get("merged_overhead")
                or _ratio(profile.get("merged_ms"), profile.get("base_ms")),
                "merged_spread": profile.get("merged_spread"),
                # figures that cannot be true as measured (peft_core.profile.latency_flags)
                "latency_flags": profile.get("latency_flags") or [],
                "mergeable": profile.get("mergeable"),
                # full fine-tuning: the model itself trained, stored whole (nothing to merge)
                "whole_model": whole_model(run.method),
                "quality_metric": metric,
                "quality": value,
                "base_quality": run.summary.get(f"base_{metric}"),
                "adapter_bytes": profile.get("adapter_bytes"),
                "peak_memory_mb": profile.get("peak_memory_mb"),
                "memory_kind": profile.get("memory_kind"),  # "cuda" peak or CPU "rss" growth
                "tokens_per_s": profile.get("tokens_per_s"),
                "train_s": profile.get("train_s") or profile.get("wall_s"),
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
    if isinstance(value, list):  # e.g. latency_flags: sentences, one cell
        value = " ".join(map(str, value))
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
