"""How the workers' measurements read on the pages: at a precision that keeps a small figure
from reading as zero, with what was measured in the title, and "—" where nothing was."""

from django import template
from django.contrib.humanize.templatetags.humanize import intcomma
from django.utils.html import format_html

register = template.Library()

# What profile["peak_memory_mb"] is, by profile["memory_kind"] (workers/training.py).
MEMORY_MEASURED = {
    "cuda": "CUDA's peak of allocated tensor memory while training, the model included.",
    "heap": "The training's own peak of CPU memory in use (the C allocator's count, sampled "
    "every 50 ms and at every step), above what the process held when training began: the "
    "loaded model is not counted.",
    "rss": "How much the worker's resident memory (RSS) grew while training on a CPU; "
    "memory the process already held, such as the loaded model, is not counted.",
}
# On a CPU a peak of 0 is RSS that did not grow: training fit in memory the process already
# held. That is no measurement of what training needed, so it is not shown as "0 MiB".
MEMORY_NOT_MEASURED = {
    "rss": "Not measured on this device: on a CPU only the growth of the worker's resident "
    "memory is seen, and this training fit in memory the process already held.",
}
NOT_MEASURED = "Not measured for this run."
MEMORY_KIND_TEXT = {
    "cuda": "(CUDA peak)",
    "heap": "(CPU: the training's own peak, above the loaded model)",
    "rss": "(CPU RSS growth)",
}


@register.simple_tag
def memory_kind_text(kind: str | None) -> str:
    return MEMORY_KIND_TEXT.get(kind or "", "")


@register.simple_tag
def conditions_text(conditions: dict | None) -> str:
    """The conditions a figure was measured under, as a phrase: "load 1.9 on 2 CPUs, 2 runs
    on this host (this one included), 2 torch threads"."""
    if not conditions:
        return ""
    parts = []
    if conditions.get("load_1m") is not None:
        parts.append(f"load {conditions['load_1m']:.1f} on {conditions.get('cpus') or '?'} CPUs")
    runs = conditions.get("runs_on_host")
    if runs:
        parts.append(
            "this run alone on its host"
            if runs == 1
            else f"{runs} runs on this host (this one included)"
        )
    if conditions.get("threads"):
        parts.append(f"{conditions['threads']} torch threads")
    if conditions.get("device"):
        parts.append(f"on {conditions['device']}")
    return ", ".join(parts)


@register.simple_tag
def peak_memory(mib: float | None, kind: str | None) -> str:
    """A peak in MiB: "12 MiB", "0.4 MiB", "<0.1 MiB", or "—" with the reason in its title."""
    if mib is None or mib <= 0:
        return format_html('<span title="{}">—</span>', MEMORY_NOT_MEASURED.get(kind, NOT_MEASURED))
    return format_html('<span title="{}">{}</span>', MEMORY_MEASURED.get(kind, ""), mib_text(mib))


def mib_text(mib: float) -> str:
    if mib < 0.1:
        return "<0.1 MiB"
    if mib < 10:
        return f"{mib:.1f} MiB"
    return f"{intcomma(round(mib))} MiB"


# Under this much training, tokens/s moves by tens of percent from one run to the next.
STEADY_SECONDS = 30.0


@register.simple_tag
def tokens_per_second(rate: float | None, seconds: float | None) -> str:
    """Three significant figures, no more than such a measurement holds, with the training
    time it was measured over in the title."""
    if not rate:
        return "—"
    title = "Tokens per second while training, on the worker"
    if seconds:
        title += f", over {seconds:.1f} s"
        if seconds < STEADY_SECONDS:
            title += ": too short a training for a steady figure"
    return format_html('<span title="{}.">{}</span>', title, intcomma(significant(rate, 3)))


def significant(value: float, digits: int) -> int | float:
    """value rounded to `digits` significant figures: 123456 -> 123000, 0.01234 -> 0.0123."""
    rounded = float(f"{value:.{digits}g}")
    return int(rounded) if rounded >= 10 ** (digits - 1) else rounded


@register.filter
def duration(seconds: float | None) -> str:
    """A time left, as a person says it: "40 s", "12 min", "2 h 05 min"."""
    if seconds is None:
        return ""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


@register.filter
def metric(value: float | None) -> str:
    """A summary number in a table: four significant figures, every digit in its title; "—"
    for a run that has none."""
    if value is None:
        return "—"
    return format_html('<span title="{}">{}</span>', repr(value), f"{value:.4g}")
