"""The task metrics' formulas (peft_core/task_metrics.py) against values worked out by hand."""

import pytest

from peft_core import task_metrics as tm
from peft_core.checks import ConfigError
from peft_core.configs import TrainConfig, refuse_eval_metrics


def test_exact_match_normalises_whitespace_only():
    assert tm.exact_match("  5 March\n\t 2024 ", "5 March 2024") == 1.0
    assert tm.exact_match("5 march 2024", "5 March 2024") == 0.0  # case counts
    assert tm.exact_match("5 March 2024.", "5 March 2024") == 0.0


def test_contains_looks_for_the_reference_in_the_answer():
    assert tm.contains("The date is 5 March  2024, I think.", "5 March 2024") == 1.0
    assert tm.contains("5 March", "5 March 2024") == 0.0


def test_token_f1_is_squads():
    # "the cat sat on the mat" -> cat sat on mat (4 words); "a cat sat" -> cat sat (2);
    # 2 shared: P = 2/4, R = 2/2, F1 = 2·0.5·1 / 1.5 = 2/3
    assert tm.token_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    assert tm.token_f1("Paris!", "paris") == 1.0
    assert tm.token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # multiplicity
    assert tm.token_f1("", "Paris") == 0.0
    assert tm.token_f1("the", "a") == 1.0  # both nothing once articles go, as SQuAD scores it
    assert tm.token_f1("dog", "cat") == 0.0


def test_rouge_l_is_the_lcs_f_measure():
    # 7 predicted words, 6 reference words, LCS 6: P = 6/7, R = 1, F = 12/13
    prediction, reference = "the cat was found under the bed", "the cat was under the bed"
    assert tm.rouge_l(prediction, reference) == pytest.approx(12 / 13)
    assert tm.rouge_l("bed the under", "the bed") == pytest.approx(2 * (1 / 3) * (1 / 2) / (5 / 6))
    assert tm.rouge_l("Привет, мир", "привет мир") == 1.0  # words of any script count


def test_chrf_by_hand():
    # "ab" vs "ac": 1-grams P = R = 1/2; 2-grams "ab" vs "ac" P = R = 0 -> P = R = 1/4, F = 1/4
    assert tm.chrf("ab", "ac") == pytest.approx(0.25)
    assert tm.chrf("a b", "ab") == 1.0  # whitespace is not a character of chrF
    assert tm.chrf("5 March 2024", "5 March 2024") == 1.0
    # "42" vs "4242": n=1 P = 2/2, R = 2/4; n=2 P = 1/1, R = 1/3; n ≥ 3: "42" has none.
    # P = 1, R = 5/12; chrF2 = 5·P·R / (4·P + R) = (25/12) / (53/12) = 25/53
    assert tm.chrf("42", "4242") == pytest.approx(25 / 53)
    # recall weighs more than precision (β = 2): the reverse pair scores higher
    assert tm.chrf("4242", "42") == pytest.approx(5 * (5 / 12) / (4 * 5 / 12 + 1))
    assert tm.chrf("", "42") == 0.0
    assert tm.chrf("xyz", "42") == 0.0


def test_generation_sums_and_means_average_the_rows():
    names = ["exact_match", "contains"]
    sums = tm.generation_sums(names, ["a b", "x a b", "z"], ["a  b", "a b", "a b"])
    assert sums == [1.0, 2.0]
    assert tm.generation_means(names, sums, 3) == {
        "eval_exact_match": pytest.approx(1 / 3),
        "eval_contains": pytest.approx(2 / 3),
    }
    with pytest.raises(ValueError, match="no validation rows"):
        tm.generation_means(names, [0.0, 0.0], 0)


def test_macro_f1_over_the_classes_seen():
    # predicted 0 0 1 2, expected 0 1 1 1 (4 classes, class 3 never seen):
    # class 0: TP 1 FP 1 FN 0 -> 2/3; class 1: TP 1 FP 0 FN 2 -> 1/2; class 2: TP 0 FP 1 -> 0
    counts = tm.class_counts([0, 0, 1, 2], [0, 1, 1, 1], 4)
    assert counts == [1, 1, 0, 1, 0, 2, 0, 1, 0, 0, 0, 0]
    assert tm.macro_f1(counts) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert tm.macro_f1(tm.class_counts([1, 0], [1, 0], 2)) == 1.0


def test_train_config_takes_known_names_once_in_their_order():
    config = TrainConfig(eval_metrics=["rouge_l", "exact_match", "rouge_l"])
    assert config.eval_metrics == ("exact_match", "rouge_l")
    assert TrainConfig(eval_metrics="chrf, contains").eval_metrics == ("contains", "chrf")
    assert TrainConfig().eval_metrics == () and TrainConfig().max_new_tokens == 32
    with pytest.raises(ConfigError, match="unknown eval metric 'bleu'") as refused:
        TrainConfig(eval_metrics=["bleu"])
    assert refused.value.field == "eval_metrics"
    with pytest.raises(ConfigError, match="max_new_tokens must be an integer in 1..512"):
        TrainConfig(max_new_tokens=0)


def test_metrics_are_refused_where_the_task_cannot_compute_them():
    refuse_eval_metrics(("accuracy", "macro_f1"), task="seq-cls")
    refuse_eval_metrics(("exact_match",), task="causal-lm", columns=("prompt", "completion"))
    with pytest.raises(ConfigError, match="exact_match does not apply to classification"):
        refuse_eval_metrics(("exact_match",), task="seq-cls")
    with pytest.raises(ConfigError, match="macro_f1 does not apply to generation"):
        refuse_eval_metrics(("macro_f1",), task="causal-lm")
    with pytest.raises(ConfigError, match="this dataset has text rows"):
        refuse_eval_metrics(("chrf",), task="causal-lm", columns=("text",))
