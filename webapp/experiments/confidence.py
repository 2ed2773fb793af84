"""Repeats of one configuration over seeds, and what they let the compare page say.

Replicates. Runs are repeats of one configuration when their base model, dataset, method,
method config and training config are equal but for train_config["seed"]. The group is
derived from the configs, not stored: it then also gathers runs launched one by one, a
sweep's `train.seed` list, and runs trained elsewhere that report a seed. A run whose
training config names no seed is a configuration of its own (nothing says it was one seed
of several). Where two runs of a group share a seed, the newer one's value counts: the
same seed twice is one observation, not two.

Interval. Over n values, the mean ± t(0.975, n−1) · s / √n, s the sample standard deviation
(n − 1 in its denominator): Student's t, the 95 % interval for a mean of a few values. With
2 seeds t is 12.7, with 3 it is 4.30, with 10 it is 2.26: few seeds give wide intervals,
and the page says how many there were. With 1 seed there is no interval, only the value.

No clear difference. Two configurations whose intervals (each of 2 seeds or more) overlap
are not told apart by these runs. Overlap is the cautious reading: two intervals that
overlap a little may still differ under a direct test, but two that do not overlap differ.

Direction. Which way is better is written once, in `lower_is_better`: a loss (or
perplexity) is better lower, every other quality metric (accuracy, exact match, F1,
ROUGE-L, chrF, contains) higher.
"""

import json
import math
import re
from dataclasses import dataclass, field

# Student's t, 0.975 quantile, for 1 to 30 degrees of freedom (the standard tables).
T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
Z_975 = 1.959964


def t_975(df: int) -> float:
    """Student's t 0.975 quantile: the table up to 30 degrees of freedom, then the
    Cornish-Fisher expansion around the normal quantile (within 1e-4 from 30 on)."""
    if df < 1:
        raise ValueError("an interval needs at least 2 values")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


@dataclass(frozen=True)
class Interval:
    """A mean over n values and its 95 % interval (low == high == mean when n is 1)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half(self) -> float:
        return (self.high - self.low) / 2

    def text(self, *, seeds: bool = True) -> str:
        """ "0.612 ± 0.041 (3 seeds)", or "0.6123 (1 seed)": the half-width to 2 significant
        figures, the mean to the same decimal place."""
        if self.n < 2:
            return f"{self.mean:.4g}" + (" (1 seed)" if seeds else "")
        places = 4 if self.half <= 0 else min(8, max(0, 1 - math.floor(math.log10(self.half))))
        text = f"{self.mean:.{places}f} ± {self.half:.{places}f}"
        return text + (f" ({self.n} seeds)" if seeds else "")


def interval(values: list[float]) -> Interval | None:
    """The mean and 95 % interval of `values` (None when there are none)."""
    n = len(values)
    if n == 0:
        return None
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, mean, mean, 1)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_975(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def overlap(a: Interval, b: Interval) -> bool | None:
    """Whether the two intervals overlap; None when either rests on one seed (no interval)."""
    if a.n < 2 or b.n < 2:
        return None
    return a.low <= b.high and b.low <= a.high


LOWER_IS_BETTER = ("loss", "perplexity")


def lower_is_better(metric: str) -> bool:
    """eval_loss, base_eval_loss, eval_perplexity: lower is better; any other metric higher."""
    return metric.endswith(LOWER_IS_BETTER)


def better(a: float, b: float, metric: str) -> bool:
    """Whether value a is strictly better than b for `metric`."""
    return a < b if lower_is_better(metric) else a > b


# ---- replicate groups ----------------------------------------------------------------------

SEED = "seed"
# What a sweep adds to a run's name for its seed: " · seed 43", or " train.seed=43" (a grid).
SEED_IN_NAME = re.compile(r"(\s*·\s*seed \d+|\s+train\.seed=\d+)(?=$|\s)")


def replicate_key(run) -> str:
    """What a run's repeats share: everything it was trained with but the seed. A run whose
    training config has no seed is keyed by its own id."""
    train = dict(run.train_config or {})
    if SEED not in train:
        return f"run:{run.id}"
    train.pop(SEED)
    config = [run.base_model, run.dataset_id, run.method, run.method_config, train]
    return json.dumps(config, sort_keys=True, default=str)


@dataclass
class Configuration:
    """The runs of one configuration, in the order compared, and its numbers per metric."""

    key: str
    runs: list
    label: str = ""
    values: dict[str, Interval] = field(default_factory=dict)  # metric -> over its seeds
    bases: dict[str, Interval] = field(default_factory=dict)  # base_<metric> -> over its seeds

    @property
    def first(self):
        return self.runs[0]

    @property
    def seeds(self) -> list:
        return [run.train_config.get(SEED) for run in self.runs]

    @property
    def runs_by_seed(self) -> list:
        """The runs, numeric seeds in order (a script may report any value as its seed)."""

        def order(run):
            seed = run.train_config.get(SEED)
            number = isinstance(seed, int | float) and not isinstance(seed, bool)
            return (not number, seed if number else 0, run.id)

        return sorted(self.runs, key=order)


def configurations(runs: list, metrics: list[str]) -> list["Configuration"]:
    """The runs grouped by replicate_key, groups in the order of their first run, with the
    interval of each metric (and of its base_ value) over one value per seed."""
    groups: dict[str, Configuration] = {}
    for run in runs:
        key = replicate_key(run)
        groups.setdefault(key, Configuration(key=key, runs=[])).runs.append(run)
    for group in groups.values():
        group.label = _label(group.runs)
        for metric in metrics:
            for target, name in ((group.values, metric), (group.bases, f"base_{metric}")):
                found = interval(per_seed_values(group.runs, name))
                if found is not None:
                    target[metric] = found
    return list(groups.values())


def per_seed_values(runs: list, metric: str) -> list[float]:
    """One number per seed: the newest run's (by id) where several share a seed."""
    by_seed = {}
    for run in sorted(runs, key=lambda r: r.id):
        value = (run.summary or {}).get(metric)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            by_seed[repr(run.train_config.get(SEED, run.id))] = float(value)
    return list(by_seed.values())


def _label(runs: list) -> str:
    """A run's name; for repeats, their name without its seed part when they agree on it."""
    if len(runs) == 1:
        return runs[0].name
    names = [SEED_IN_NAME.sub("", run.name).strip() for run in runs]
    return names[0] if len(set(names)) == 1 else f"{names[0]} (and {len(names) - 1} more)"


# ---- what the page concludes ---------------------------------------------------------------


def best(groups: list[Configuration], metric: str) -> Configuration | None:
    """The configuration with the best mean; on a tie, the first (callers order by size)."""
    chosen = None
    for group in groups:
        value = group.values.get(metric)
        if value is not None and (
            chosen is None or better(value.mean, chosen.values[metric].mean, metric)
        ):
            chosen = group
    return chosen


def no_clear_difference(groups: list[Configuration], metric: str) -> dict[str, str]:
    """{group key: label of the best} for each configuration whose interval overlaps the
    best configuration's (both of 2 seeds or more)."""
    top = best(groups, metric)
    if top is None:
        return {}
    return {
        group.key: top.label
        for group in groups
        if group is not top
        and metric in group.values
        and overlap(group.values[metric], top.values[metric])
    }


def pareto_front(points: list[tuple[float, float]], metric: str) -> list[int]:
    """Indexes of the points (trainable params, quality) that no other point beats: none
    has as few parameters or fewer and as good a quality or better, one of them strictly.
    Sorted by parameters."""
    front = []
    for i, (params, value) in enumerate(points):
        dominated = any(
            p <= params
            and not better(value, v, metric)
            and (p < params or better(v, value, metric))
            for j, (p, v) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


# The budgets the recommendation reads the front at: trainable share of the model, in %.
BUDGETS = (0.01, 0.1, 1.0, 10.0, 100.0)
MAX_NAMED = 3


def recommendation(
    groups: list[Configuration], metric: str, *, percent: dict[str, float], names: dict[str, str]
) -> str:
    """One line: the best quality under each budget of trainable share where it improves
    on the smaller budget's, with its interval and the configurations not clearly
    different from it. `percent` and `names` are by group key (a group without a
    trainable share is left out)."""
    rated = sorted(
        (g for g in groups if g.key in percent and metric in g.values), key=lambda g: percent[g.key]
    )
    parts, previous = [], None
    for budget in BUDGETS:
        within = [g for g in rated if percent[g.key] < budget or budget == BUDGETS[-1]]
        top = best(within, metric)
        if top is None or top is previous:
            continue
        previous = top
        parts.append(_budget_text(budget, top, within, metric, names, first=not parts))
    return "; ".join(parts) + "." if parts else ""


def _budget_text(budget, top, within, metric, names, *, first: bool) -> str:
    where = f"up to {budget:g} %" if budget == BUDGETS[-1] else f"under {budget:g} %"
    value = top.values[metric].text()
    text = (
        f"{where} trainable: {names[top.key]}, {metric} {value}"
        if first
        else (f"{where}: {names[top.key]}, {value}")
    )
    alike = [
        names[g.key]
        for g in within
        if g is not top and overlap(g.values[metric], top.values[metric])
    ]
    if alike:
        more = len(alike) - MAX_NAMED
        listed = ", ".join(alike[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")
        text += f" — no clear difference from {listed}"
    return text[0].upper() + text[1:] if first else text
