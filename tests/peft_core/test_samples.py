"""The built-in sample datasets: deterministic, big enough, correct answers."""

import json
import re

import pytest

from peft_core.data import label_names, parse_dataset
from peft_core.samples import SAMPLES, sample_rows


def test_samples_are_listed_with_their_tasks():
    assert {key: spec.task for key, spec in SAMPLES.items()} == {
        "sample-instructions": "causal-lm",
        "sample-sentiment": "seq-cls",
    }


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_samples_are_big_split_and_deterministic(key):
    train, validation = sample_rows(key)
    assert len(train) + len(validation) >= 2000
    assert len(validation) == round(0.1 * (len(train) + len(validation)))
    assert (train, validation) == sample_rows(key)


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_validation_never_repeats_a_training_input(key):
    train, validation = sample_rows(key)
    column = "prompt" if SAMPLES[key].task == "causal-lm" else "text"
    assert not {row[column] for row in train} & {row[column] for row in validation}


def test_callers_get_copies():
    train, _ = sample_rows("sample-sentiment")
    train[0]["label"] = "changed"
    train.clear()
    assert sample_rows("sample-sentiment")[0][0]["label"] != "changed"


def test_unknown_sample_is_a_clear_key_error():
    with pytest.raises(KeyError, match="sample-instructions"):
        sample_rows("sample-nope")


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_samples_pass_the_upload_parser(key):
    train, validation = sample_rows(key)
    jsonl = "\n".join(json.dumps(row) for row in train + validation).encode()
    assert parse_dataset(jsonl, fmt="jsonl", task=SAMPLES[key].task) == train + validation


def test_sentiment_labels_are_balanced_and_negation_flips():
    train, validation = sample_rows("sample-sentiment")
    rows = train + validation
    assert label_names(rows) == ["negative", "positive"]
    positives = sum(row["label"] == "positive" for row in rows)
    assert 0.4 < positives / len(rows) < 0.6
    by_text = {row["text"]: row["label"] for row in rows}
    assert any(" not great" in text and label == "negative" for text, label in by_text.items())
    assert any(" not awful" in text and label == "positive" for text, label in by_text.items())


# Every instruction family, with a checker that recomputes the answer from the prompt.
CHECKERS = {
    r"(?:Reverse the word: |Spell '|Write )(\w+)(?:'? backwards\.| in reverse\.)?": lambda m: m[1][
        ::-1
    ],
    r"(?:Uppercase|Write in capital letters): (.+)": lambda m: m[1].upper(),
    r"(?:Add |What is |Sum of )(\d+)(?: and | \+ )(\d+)[.?:]": lambda m: str(int(m[1]) + int(m[2])),
    r"Next letter after (\w):": lambda m: chr(ord(m[1]) + 1),
    r"Letter before (\w):": lambda m: chr(ord(m[1]) - 1),
    r"(?:Sort alphabetically|Put in alphabetical order): (.+)": lambda m: ", ".join(
        sorted(m[1].split(", "))
    ),
}


def test_instruction_answers_are_right():
    train, validation = sample_rows("sample-instructions")
    checked = 0
    for row in train + validation:
        for pattern, answer in CHECKERS.items():
            match = re.fullmatch(pattern, row["prompt"])
            if match:
                assert row["completion"] == answer(match), row
                checked += 1
                break
        else:
            assert "opposite" in row["prompt"] or row["prompt"].startswith("Antonym of")
    assert checked > 0.9 * (len(train) + len(validation))
