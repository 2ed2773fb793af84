"""The metric curves the pages draw, named once: the run page's chart and the compare page's
curve picker read this list (the server chooses the series, `json_script` hands the list to
run.js and compare.js), so a new metric is one line here."""

from dataclasses import asdict, dataclass

from peft_core.task_metrics import EVAL_METRIC_CHOICES


@dataclass(frozen=True)
class DisplayedMetric:
    key: str  # the metric's key in MetricPoint
    label: str  # as the legend, the axis and the picker say it
    mode: str  # Plotly's scatter mode: a per-step series draws lines, an eval adds markers
    run_page: bool = False  # drawn on the run page (in its `chart`)
    compare: bool = False  # offered by the compare page's curve picker
    smoothed: bool = False  # the compare page's smoothing applies (noisy per-step series)
    chart: str = "loss"  # the run page's chart that draws it (a SYSTEM_CHARTS one for sys/)
    axis: str = "loss"  # that chart's y axis


# The run page's "System" section: the sys/ metrics a training worker samples
# (workers/system.py), per chart, for the process tree and each GPU a run can span.
SYSTEM_CHARTS = (
    ("sys-usage", "CPU and GPU utilisation"),
    ("sys-memory", "Memory"),
    ("sys-power", "GPU power"),
)
SYSTEM_GPUS = 8  # a run spans at most 8 devices


def _system_metrics() -> tuple[DisplayedMetric, ...]:
    def system(key: str, label: str, chart: str, axis: str) -> DisplayedMetric:
        return DisplayedMetric(key, label, "lines+markers", run_page=True, chart=chart, axis=axis)

    metrics = [
        system("sys/cpu_percent", "CPU (100 = one core)", "sys-usage", "%"),
        system("sys/rss_mib", "RSS (training processes)", "sys-memory", "MiB"),
    ]
    for i in range(SYSTEM_GPUS):
        metrics += [
            system(f"sys/gpu{i}/util_percent", f"GPU {i} utilisation", "sys-usage", "%"),
            system(f"sys/gpu{i}/mem_mib", f"GPU {i} memory used", "sys-memory", "MiB"),
            system(f"sys/gpu{i}/power_w", f"GPU {i} power", "sys-power", "W"),
        ]
    return tuple(metrics)


# The task metrics (peft_core.task_metrics): the run page's "Task metrics" chart draws each
# run's eval_<name> curve beside its base model's point at step 0, on one 0-1 axis.
TASK_CHART = ("task", "Task metrics")
TASK_AXIS = "score (0 to 1)"


def task_label(name: str) -> str:
    """A task metric as the pages name it: "exact match", "macro-F1", "ROUGE-L"."""
    short = dict(EVAL_METRIC_CHOICES)[name].split(" (")[0].split(",")[0]
    return short[0].lower() + short[1:] if short[1:2].islower() else short


def _task_metrics() -> tuple[DisplayedMetric, ...]:
    metrics = []
    for name, _ in EVAL_METRIC_CHOICES:
        short = f"eval {task_label(name)}"
        metrics += [
            DisplayedMetric(f"eval_{name}", short, "lines+markers", True, True, chart="task",
                            axis=TASK_AXIS),
            DisplayedMetric(f"base_eval_{name}", f"base model {short}", "markers",
                            run_page=True, chart="task", axis=TASK_AXIS),
        ]  # fmt: skip
    return tuple(metrics)


DISPLAYED_METRICS = (
    DisplayedMetric("train_loss", "train loss", "lines", True, True, smoothed=True),
    DisplayedMetric("eval_loss", "eval loss", "lines+markers", True, True),
    DisplayedMetric("base_eval_loss", "base model eval loss", "markers", run_page=True),
    DisplayedMetric("learning_rate", "learning rate", "lines", compare=True),
    *_task_metrics(),
    *_system_metrics(),
)
RUN_PAGE_KEYS = tuple(metric.key for metric in DISPLAYED_METRICS if metric.run_page)
COMPARE_KEYS = tuple(metric.key for metric in DISPLAYED_METRICS if metric.compare)


def task_metric_rows(summary: dict) -> list[dict]:
    """The run page's rows of task metrics: base model → adapter, for those the run scored
    (accuracy has rows of its own)."""
    rows = []
    for name, _ in EVAL_METRIC_CHOICES:
        base, trained = summary.get(f"base_eval_{name}"), summary.get(f"eval_{name}")
        if name != "accuracy" and (base is not None or trained is not None):
            rows.append({"name": name, "label": task_label(name), "base": base,
                         "trained": trained})  # fmt: skip
    return rows


def displayed(*, run_page: bool = False, compare: bool = False) -> list[dict]:
    """The list a page's script draws from, as plain dicts for `json_script`."""
    return [
        asdict(metric)
        for metric in DISPLAYED_METRICS
        if (run_page and metric.run_page) or (compare and metric.compare)
    ]
