"""Task metrics beside the eval loss: pure functions of predictions and references.

Classification (seq-cls), over the evaluated rows, y the label and ŷ the argmax class:

    accuracy   #(ŷ = y) / n
    macro_f1   mean over the classes c seen (in y or ŷ) of  F1_c = 2·TP_c / (2·TP_c + FP_c + FN_c)

Generation (causal LM): the greedy answer ŷ to each validation prompt (peft_core.decoding)
against its completion y, each row scored in [0, 1], the metric the mean over rows:

    exact_match  ws(ŷ) = ws(y)         ws: strip, and every run of whitespace one space
    contains     ws(y) is a substring of ws(ŷ)
    token_f1     SQuAD's F1 over the words of norm(ŷ) and norm(y): 2·P·R / (P + R),
                 P = shared / |words(ŷ)|, R = shared / |words(y)| (shared counted with
                 multiplicity); norm: lower case, punctuation and the articles a, an, the
                 dropped, whitespace as ws
    rouge_l      ROUGE-L F-measure (the `rouge-score` library, Lin 2004): longest common
                 subsequence of the words, F = 2·P·R / (P + R), P = LCS / |ŷ|, R = LCS / |y|;
                 words: runs of letters and digits of any script, lower-cased (rouge-score's
                 own tokenizer keeps a-z0-9 only, so a non-Latin answer would score 0)
    chrf         chrF (Popović 2015, "chrF: character n-gram F-score for automatic MT
                 evaluation"): character n-grams of the text without whitespace, n = 1..6;
                 P_n = matches_n / hyp n-grams, R_n = matches_n / ref n-grams (matches: the
                 multiset intersection), averaged over the orders n that both texts are long
                 enough to have (sacrebleu's "effective order"), then
                 chrF_β = (1 + β²)·P·R / (β²·P + R) with β = 2 (recall weighs 4× precision);
                 per row (sentence chrF), scaled to [0, 1] where sacrebleu prints 0-100

Every metric is a mean of per-row scores (or of per-class counts), so ranks of a data-parallel
evaluation add their `sums` and the means come out as one process's (peft_core.train).
Importing this module loads neither torch nor rouge-score: the web validates metric names
with it.
"""

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
GENERATION_METRICS = ("exact_match", "contains", "token_f1", "rouge_l", "chrf")
METRICS_BY_TASK = {"seq-cls": CLASSIFICATION_METRICS, "causal-lm": GENERATION_METRICS}
EVAL_METRIC_CHOICES = (
    ("accuracy", "Accuracy (classification)"),
    ("macro_f1", "Macro-F1 (classification)"),
    ("exact_match", "Exact match (generation)"),
    ("contains", "Contains the answer (generation)"),
    ("token_f1", "Token F1, SQuAD-style (generation)"),
    ("rouge_l", "ROUGE-L (generation)"),
    ("chrf", "chrF (generation)"),
)
EVAL_METRICS = tuple(name for name, _ in EVAL_METRIC_CHOICES)
CHRF_ORDER = 6
CHRF_BETA = 2.0
ARTICLES = re.compile(r"\b(a|an|the)\b")
WORD = re.compile(r"\w+")


def metric_key(name: str) -> str:
    """The key a metric is logged under: eval_<name> (base_eval_<name> for the base model)."""
    return f"eval_{name}"


def metrics_for_task(names: Iterable[str], task: str) -> list[str]:
    """The metrics of `names` that `task` computes, in the order of EVAL_METRICS."""
    wanted = set(names)
    return [name for name in METRICS_BY_TASK.get(task, ()) if name in wanted]


# ---------------------------------------------------------------- generation


def whitespace_normalised(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(whitespace_normalised(prediction) == whitespace_normalised(reference))


def contains(prediction: str, reference: str) -> float:
    return float(whitespace_normalised(reference) in whitespace_normalised(prediction))


def squad_normalised(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if not unicodedata.category(c).startswith("P"))
    return whitespace_normalised(ARTICLES.sub(" ", text))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = squad_normalised(prediction).split(), squad_normalised(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


class _Words:
    """rouge-score's tokenizer interface: lower-cased runs of letters and digits, any script."""

    def tokenize(self, text: str) -> list[str]:
        return WORD.findall(text.lower())


_rouge = None


def rouge_l(prediction: str, reference: str) -> float:
    global _rouge
    if _rouge is None:
        from rouge_score.rouge_scorer import RougeScorer  # imports nltk: only when used

        _rouge = RougeScorer(["rougeL"], tokenizer=_Words())
    return _rouge.score(reference, prediction)["rougeL"].fmeasure


def char_ngrams(text: str, n: int) -> Counter:
    """The character n-grams of `text` without its whitespace, with their counts."""
    chars = "".join(text.split())
    return Counter(chars[i : i + n] for i in range(len(chars) - n + 1))


def chrf(
    prediction: str, reference: str, *, order: int = CHRF_ORDER, beta: float = CHRF_BETA
) -> float:
    """Sentence chrF in [0, 1] (module docstring)."""
    precisions, recalls = [], []
    for n in range(1, order + 1):
        hyp, ref = char_ngrams(prediction, n), char_ngrams(reference, n)
        if not hyp or not ref:
            continue  # one text is shorter than n characters: not an effective order
        matches = sum((hyp & ref).values())
        precisions.append(matches / hyp.total())
        recalls.append(matches / ref.total())
    if not precisions:  # an empty text: only two empty texts agree
        return float(not char_ngrams(prediction, 1) and not char_ngrams(reference, 1))
    precision, recall = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if precision + recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


GENERATION_SCORERS = {
    "exact_match": exact_match,
    "contains": contains,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
    "chrf": chrf,
}


def generation_sums(
    names: Sequence[str], predictions: Sequence[str], references: Sequence[str]
) -> list[float]:
    """[Σ score of each metric in `names` order] over the rows: what ranks add up."""
    return [
        sum(GENERATION_SCORERS[name](p, r) for p, r in zip(predictions, references, strict=True))
        for name in names
    ]


def generation_means(names: Sequence[str], sums: Sequence[float], rows: int) -> dict[str, float]:
    """{eval_<name>: mean score} from generation_sums over `rows` rows."""
    if rows == 0:
        raise ValueError("no validation rows with a prompt and a completion to generate for")
    return {metric_key(name): total / rows for name, total in zip(names, sums, strict=True)}


# ---------------------------------------------------------------- classification


def class_counts(predicted: Iterable[int], expected: Iterable[int], classes: int) -> list[float]:
    """[TP_0, FP_0, FN_0, TP_1, …]: per-class counts that ranks add up, then macro_f1 reads."""
    counts = [0.0] * (3 * classes)
    for guess, truth in zip(predicted, expected, strict=True):
        if guess == truth:
            counts[3 * truth] += 1
        else:
            counts[3 * guess + 1] += 1
            counts[3 * truth + 2] += 1
    return counts


def macro_f1(counts: Sequence[float]) -> float:
    """Mean F1 over the classes that occur as a label or a prediction (class_counts' order)."""
    scores = []
    for c in range(0, len(counts), 3):
        tp, fp, fn = counts[c : c + 3]
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0
