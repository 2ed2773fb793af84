"""The compare page's trade-off table by configuration. A configuration's repeats over seeds
(confidence.py groups them) make one row, with each summary metric's mean ± 95 % interval;
the rows mark the Pareto front of trainable parameters against the chosen quality metric
and the configurations not clearly different from the best, and one line recommends a
configuration per budget of trainable parameters. The table, the charts and the CSV all
read these rows.

A configuration's cost columns (overhead, memory, tokens/s) are those of one of its runs,
the first that succeeded: they measure the machine as much as the seed, and averaging
measurements taken under different loads would make a figure nobody measured.
"""

from collections import Counter
from dataclasses import dataclass

from peft_core.task_metrics import EVAL_METRICS, metric_key
from webapp.experiments import confidence
from webapp.experiments.colors import run_color
from webapp.experiments.comparison import differing, flat_settings, tradeoff_rows
from webapp.experiments.confidence import Configuration, Interval
from webapp.experiments.exports import method_title
from webapp.experiments.models import RunStatus

# eval_ numbers of a summary that are timings, not quality (a transformers Trainer's).
NOT_QUALITY = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
# The headline metric when the runs have it, in peft_core's order of the task metrics
# (classification's first); eval_loss when they have none.
PREFERRED = tuple(metric_key(name) for name in EVAL_METRICS)
LOSS = "eval_loss"


def summary_metrics(runs: list) -> list[str]:
    """eval_loss, then every other eval_<name> number the runs' summaries hold: the task
    metrics in PREFERRED's order, then the rest (a script's own) by name."""
    found = {
        key
        for run in runs
        for key, value in (run.summary or {}).items()
        if key.startswith("eval_") and key not in NOT_QUALITY and _number(value)
    }
    known = [key for key in PREFERRED if key in found]
    return [LOSS, *known, *sorted(found - set(known) - {LOSS})]


def chosen_metric(metrics: list[str], asked: str | None) -> str:
    """The metric asked for when the runs have it; else the first preferred; else the loss."""
    if asked in metrics:
        return asked
    return next((key for key in PREFERRED if key in metrics), LOSS)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class Tradeoffs:
    metric: str  # the chosen quality metric
    metrics: list[str]  # every summary metric the table shows
    groups: list[Configuration]
    rows: list[dict]  # one per configuration, in the groups' order
    recommendation: str

    @property
    def higher_is_better(self) -> bool:
        return not confidence.lower_is_better(self.metric)

    @property
    def replicated(self) -> bool:
        return any(len(group.runs) > 1 for group in self.groups)

    def table(self) -> list[tuple[Configuration, dict, list]]:
        """(group, row, [(metric, interval, base interval, chosen)]) for the template."""
        return [
            (g, row, [(m, g.values.get(m), g.bases.get(m), m == self.metric) for m in self.metrics])
            for g, row in zip(self.groups, self.rows, strict=True)
        ]


def tradeoffs(runs: list, *, metric: str | None = None) -> Tradeoffs:
    metrics = summary_metrics(runs)
    metric = chosen_metric(metrics, metric)
    groups = confidence.configurations(runs, metrics)
    by_run = {run.id: row for run, row in zip(runs, tradeoff_rows(runs), strict=True)}
    names = short_names(groups)
    unclear = confidence.no_clear_difference(groups, metric)
    rows = [_row(g, by_run, metrics, metric, names[g.key], unclear.get(g.key)) for g in groups]
    _mark_front(rows, metric)
    percent = {
        g.key: row["trainable_percent"]
        for g, row in zip(groups, rows, strict=True)
        if _number(row["trainable_percent"])
    }
    line = confidence.recommendation(groups, metric, percent=percent, names=names)
    return Tradeoffs(metric, metrics, groups, rows, line)


def _row(group: Configuration, by_run, metrics, metric, name: str, unclear: str | None) -> dict:
    # Whose cost figures the row shows: the lowest seed that succeeded, whatever order the
    # runs came in (the page and a script reading the same sweep show the same figures).
    ordered = group.runs_by_seed
    succeeded = [r for r in ordered if r.status == RunStatus.SUCCEEDED]
    shown = (succeeded or ordered)[0]
    chosen, base = group.values.get(metric), group.bases.get(metric)
    row = dict(by_run[shown.id]) | {
        "run": group.label,
        "configuration": name,
        "run_ids": [r.id for r in group.runs],
        "seeds": group.seeds,
        "status": _statuses(group.runs),
        "color": run_color(group.first.id),
        "quality_metric": metric,
        "quality": chosen.mean if chosen else None,
        "quality_ci_low": chosen.low if chosen else None,
        "quality_ci_high": chosen.high if chosen else None,
        "quality_n": chosen.n if chosen else 0,
        "base_quality": base.mean if base else None,
        "no_clear_difference_from": unclear or "",
        "pareto": False,
        # the parallel coordinates' axes beside the table's
        "learning_rate": group.first.train_config.get("learning_rate"),
        "steps": group.first.train_config.get("steps"),
    }
    for key in metrics:
        row |= _spread(key, group.values.get(key))
    return row


def _spread(metric: str, found: Interval | None) -> dict:
    return {
        f"{metric}_mean": found.mean if found else None,
        f"{metric}_ci_low": found.low if found else None,
        f"{metric}_ci_high": found.high if found else None,
        f"{metric}_n": found.n if found else 0,
    }


def _statuses(runs: list) -> str:
    """ "succeeded", or "2 succeeded, 1 queued" for a configuration's runs."""
    counts = Counter(run.status for run in runs)
    if len(counts) == 1 and len(runs) == 1:
        return runs[0].status
    return ", ".join(f"{counts[s]} {s}" for s in RunStatus.values if counts[s])


def _mark_front(rows: list[dict], metric: str) -> None:
    rated = [r for r in rows if _number(r["trainable_params"]) and r["quality"] is not None]
    points = [(r["trainable_params"], r["quality"]) for r in rated]
    for i in confidence.pareto_front(points, metric):
        rated[i]["pareto"] = True


MAX_NAME_SETTINGS = 3


def short_names(groups: list[Configuration]) -> dict[str, str]:
    """{group key: "LoRA r=8"}: the method's name and the settings that tell the compared
    configurations apart (the seed aside; at most three); the group's label where two
    would read alike."""
    settings = [_settings(group.first) for group in groups]
    columns = list(dict.fromkeys(key for row in settings for key in row))
    differs = differing(columns, settings)
    names = {}
    for group, row in zip(groups, settings, strict=True):
        shown = [f"{key}={row[key]}" for key in columns if key in differs and key in row]
        names[group.key] = " ".join([method_title(group.first.method), *shown[:MAX_NAME_SETTINGS]])
    alike = Counter(names.values())
    return {
        key: name if alike[name] == 1 else _group(groups, key).label for key, name in names.items()
    }


def _settings(run) -> dict:
    train = {k: v for k, v in (run.train_config or {}).items() if k != confidence.SEED}
    return (
        {"model": run.base_model}
        | dict(flat_settings(run.method_config or {}))
        | {f"train.{key}": value for key, value in flat_settings(train)}
    )


def _group(groups: list[Configuration], key: str) -> Configuration:
    return next(group for group in groups if group.key == key)


CSV_LEFT_OUT = ("color",)


def csv_rows(rows: list[dict]) -> list[dict]:
    """The rows as the CSV carries them: lists as space-separated cells, no colours."""
    return [
        {
            key: " ".join(map(str, value)) if isinstance(value, list) else value
            for key, value in row.items()
            if key not in CSV_LEFT_OUT
        }
        for row in rows
    ]
