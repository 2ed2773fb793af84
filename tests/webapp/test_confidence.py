"""Seeds and confidence (issue 18, item 2): Student's t intervals, replicate groups, "no
clear difference", the Pareto front and the recommendation line, each with the metric's
direction (a loss better lower, a task metric higher)."""

import math

import pytest

from webapp.experiments import confidence
from webapp.experiments.confidence import interval, t_975
from webapp.experiments.models import Run


def _t_cdf(x: float, df: int, steps: int = 20_000) -> float:
    """Student's t CDF at x > 0 by Simpson's rule over its density: independent of the table."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(u: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(u * u / df))

    h = x / steps
    total = density(0) + density(x)
    total += sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return 0.5 + total * h / 3


@pytest.mark.parametrize(
    ("df", "value"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]
)
def test_known_t_values(df, value):
    assert t_975(df) == pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize("df", [*range(1, 41), 60, 120, 1000])
def test_every_t_value_is_the_975_quantile(df):
    """The table (1-30) and the expansion (beyond) put 97.5 % of the density below them."""
    assert _t_cdf(t_975(df), df) == pytest.approx(0.975, abs=1e-4)


def test_one_seed_is_a_value_without_an_interval():
    one = interval([0.42])
    assert (one.mean, one.low, one.high, one.n) == (0.42, 0.42, 0.42, 1)
    assert one.text() == "0.42 (1 seed)"
    assert interval([]) is None


def test_two_seeds_give_t_with_one_degree_of_freedom():
    two = interval([1.0, 3.0])  # mean 2, s = √2, half = 12.706 · √2 / √2
    assert two.mean == 2.0
    assert two.half == pytest.approx(12.7062, abs=1e-4)
    assert (two.low, two.high) == pytest.approx((2 - 12.7062, 2 + 12.7062), abs=1e-4)


def test_three_seeds_text():
    three = interval([0.40, 0.42, 0.44])  # s = 0.02, half = 4.3027 · 0.02 / √3 = 0.0497
    assert three.half == pytest.approx(4.3027 * 0.02 / math.sqrt(3), rel=1e-4)
    assert three.text() == "0.420 ± 0.050 (3 seeds)"
    assert three.text(seeds=False) == "0.420 ± 0.050"


@pytest.mark.parametrize(
    ("metric", "lower"),
    [
        ("eval_loss", True),
        ("base_eval_loss", True),
        ("eval_perplexity", True),
        ("eval_exact_match", False),
        ("eval_rouge_l", False),
        ("eval_accuracy", False),
    ],
)
def test_direction_is_written_once(metric, lower):
    assert confidence.lower_is_better(metric) is lower
    assert confidence.better(1.0, 2.0, metric) is lower


_ids = iter(range(1, 10_000))


def _run(name="r", seed=0, r=8, method="lora", status="succeeded", **summary) -> Run:
    train = {"steps": 30, "learning_rate": 1e-3} | ({} if seed is None else {"seed": seed})
    return Run(
        id=next(_ids),
        name=name,
        base_model="tiny-llama",
        dataset_id=1,
        method=method,
        method_config={"r": r},
        train_config=train,
        status=status,
        summary=summary,
    )


def test_replicates_group_by_config_without_the_seed():
    runs = [
        _run("s · lora r=8 · seed 0", seed=0, eval_loss=1.0),
        _run("s · lora r=4 · seed 0", seed=0, r=4, eval_loss=2.0),
        _run("s · lora r=8 · seed 1", seed=1, eval_loss=1.2),
        _run("s · lora r=8 · seed 2", seed=2, eval_loss=1.4),
        _run("alone", seed=None, eval_loss=3.0),
        _run("alone too", seed=None, eval_loss=3.0),  # no seed: not known to be a repeat
    ]
    groups = confidence.configurations(runs, ["eval_loss"])
    assert [len(g.runs) for g in groups] == [3, 1, 1, 1]
    assert groups[0].label == "s · lora r=8"
    assert groups[0].seeds == [0, 1, 2]
    assert groups[0].values["eval_loss"].mean == pytest.approx(1.2)
    assert groups[0].values["eval_loss"].n == 3


def test_repeats_list_by_seed_whatever_a_script_called_its_seed():
    runs = [_run(seed=2), _run(seed=0), _run(seed=1)]
    (group,) = confidence.configurations(runs, [])
    assert [r.train_config["seed"] for r in group.runs_by_seed] == [0, 1, 2]
    odd = [_run(seed="b"), _run(seed=3), _run(seed=None)]
    odd[2].train_config["seed"] = "a"  # same config, seeds of other types
    assert [r.train_config["seed"] for r in confidence.configurations(odd, [])[0].runs_by_seed] == [
        3,
        "b",
        "a",
    ]


def test_a_seed_run_twice_counts_once_the_newest():
    old, new = _run(seed=5, eval_loss=9.0), _run(seed=5, eval_loss=1.0)
    other = _run(seed=6, eval_loss=3.0)
    (group,) = confidence.configurations([new, old, other], ["eval_loss"])
    assert group.values["eval_loss"].n == 2
    assert group.values["eval_loss"].mean == pytest.approx(2.0)


def test_base_values_and_unfinished_runs():
    runs = [
        _run(seed=0, eval_exact_match=0.5, base_eval_exact_match=0.1),
        _run(seed=1, status="queued"),
    ]
    (group,) = confidence.configurations(runs, ["eval_exact_match", "eval_loss"])
    assert group.values["eval_exact_match"].n == 1
    assert group.bases["eval_exact_match"].mean == 0.1
    assert "eval_loss" not in group.values


def _group(values, metric="eval_exact_match", r=8, method="lora"):
    runs = [_run(seed=i, r=r, method=method, **{metric: v}) for i, v in enumerate(values)]
    return confidence.configurations(runs, [metric])[0]


def test_no_clear_difference_marks_overlaps_with_the_best():
    a = _group([0.60, 0.61, 0.62], r=8)
    b = _group([0.57, 0.60, 0.63], r=16)  # overlaps a
    c = _group([0.30, 0.31, 0.32], r=4)  # clearly worse
    d = _group([0.61], r=2)  # one seed: no interval to compare
    marks = confidence.no_clear_difference([a, b, c, d], "eval_exact_match")
    assert marks == {b.key: a.label}


def test_no_clear_difference_follows_the_direction_of_a_loss():
    low = _group([1.00, 1.01, 1.02], metric="eval_loss", r=8)
    near = _group([1.00, 1.03, 1.06], metric="eval_loss", r=16)
    high = _group([2.0, 2.1, 2.2], metric="eval_loss", r=4)
    assert confidence.best([high, near, low], "eval_loss") is low
    assert confidence.no_clear_difference([high, near, low], "eval_loss") == {near.key: low.label}


POINTS = [(100, 0.5), (1000, 0.6), (1000, 0.55), (10, 0.4), (50, 0.3)]


def test_pareto_front_where_higher_is_better():
    assert confidence.pareto_front(POINTS, "eval_exact_match") == [3, 0, 1]


def test_pareto_front_where_lower_is_better():
    # (10, 0.4) and (50, 0.3): a lower loss for more parameters; the rest are beaten by (50, 0.3).
    assert confidence.pareto_front(POINTS, "eval_loss") == [3, 4]


def test_recommendation_states_the_best_per_budget_with_its_interval():
    ia3 = _group([0.40, 0.42, 0.44], method="ia3", r=1)
    lora = _group([0.57, 0.61, 0.65], r=8)
    dora = _group([0.55, 0.59, 0.63], method="dora", r=8)
    prompt = _group([0.10, 0.12, 0.14], method="prompt", r=3)
    groups = [ia3, lora, dora, prompt]
    percent = {ia3.key: 0.05, lora.key: 0.6, dora.key: 0.62, prompt.key: 0.008}
    names = {ia3.key: "IA3", lora.key: "LoRA r=8", dora.key: "DoRA r=8", prompt.key: "Prompt"}
    line = confidence.recommendation(groups, "eval_exact_match", percent=percent, names=names)
    assert line == (
        "Under 0.01 % trainable: Prompt, eval_exact_match 0.120 ± 0.050 (3 seeds); "
        "under 0.1 %: IA3, 0.420 ± 0.050 (3 seeds); "
        "under 1 %: LoRA r=8, 0.610 ± 0.099 (3 seeds) — no clear difference from DoRA r=8."
    )


def test_recommendation_of_a_loss_picks_the_lowest():
    small = _group([2.0, 2.1, 2.2], metric="eval_loss", r=4)
    big = _group([1.0, 1.1, 1.2], metric="eval_loss", r=64)
    full = _group([1.5], metric="eval_loss", method="full", r=0)
    percent = {small.key: 0.5, big.key: 5.0, full.key: 100.0}
    names = {small.key: "LoRA r=4", big.key: "LoRA r=64", full.key: "Full"}
    line = confidence.recommendation([full, big, small], "eval_loss", percent=percent, names=names)
    # Full fine-tuning is no better than r=64 (a higher loss): no "up to 100 %" part.
    assert line == (
        "Under 1 % trainable: LoRA r=4, eval_loss 2.10 ± 0.25 (3 seeds); "
        "under 10 %: LoRA r=64, 1.10 ± 0.25 (3 seeds)."
    )
