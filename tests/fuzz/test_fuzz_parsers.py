"""Hypothesis against the dataset parsers: any bytes give rows or a DatasetError, never another
exception; valid rows written as CSV or JSON lines, in UTF-8 or UTF-16, come back unchanged."""

import codecs
import csv
import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_core.data import DatasetError, parse_dataset

FUZZ = settings(max_examples=300, derandomize=True, deadline=None)
FORMATS_TASKS = st.sampled_from(
    [("csv", "causal-lm"), ("csv", "seq-cls"), ("jsonl", "causal-lm"), ("jsonl", "seq-cls")]
)
# Pieces that parsers trip on, glued into lines that look almost right.
FRAGMENTS = [
    '"',
    ",",
    "\n",
    "\r",
    "\r\n",
    "\\",
    "[",
    "]",
    "{",
    "}",
    ":",
    " ",
    "\t",
    "\x00",
    "\x85",
    "\u2028",
    "\ufeff",
    "é",
    "😀",
    "prompt",
    "completion",
    "text",
    "label",
    '"text"',
    '"label"',
    '"prompt"',
    '"completion"',
    '{"text": "a", "label": "b"}',
    "NaN",
    "-Infinity",
    "1e999",
    "9" * 30,
    "\\ud800",
    "\\u0000",
    "true",
    "null",
    "=1+1",
    "[" * 50,
    "{" * 30,
]
ENCODINGS = {
    "utf-8": lambda text: text.encode("utf-8", "surrogatepass"),
    "utf-8-bom": lambda text: codecs.BOM_UTF8 + text.encode("utf-8", "surrogatepass"),
    "utf-16": lambda text: codecs.BOM_UTF16_LE + text.encode("utf-16-le", "surrogatepass"),
}


def _parse_or_refuse(data: bytes, fmt: str, task: str) -> None:
    try:
        rows = parse_dataset(data, fmt=fmt, task=task)
    except DatasetError as error:
        assert str(error)  # a message a person can read
        return
    assert rows and all(isinstance(value, str) for row in rows for value in row.values())


@FUZZ
@given(data=st.binary(max_size=2000), fmt_task=FORMATS_TASKS)
def test_any_bytes_give_rows_or_a_dataset_error(data, fmt_task):
    _parse_or_refuse(data, *fmt_task)


@FUZZ
@given(
    pieces=st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=8), max_size=60),
    header=st.sampled_from(["text,label\n", "prompt,completion\n", '{"text": "x", "label": 1}\n']),
    encoding=st.sampled_from(sorted(ENCODINGS)),
    fmt_task=FORMATS_TASKS,
)
def test_almost_valid_files_give_rows_or_a_dataset_error(pieces, header, encoding, fmt_task):
    _parse_or_refuse(ENCODINGS[encoding](header + "".join(pieces)), *fmt_task)


# Text a row may hold: no NUL and no lone surrogate (refused by design), not blank.
VALUE = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1
).filter(str.strip)
LABEL = VALUE.map(str.strip)  # labels are stripped on the way in


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _jsonl(rows: list[dict], ensure_ascii: bool) -> str:
    return "\n".join(json.dumps(row, ensure_ascii=ensure_ascii) for row in rows) + "\n"


@settings(max_examples=150, derandomize=True, deadline=None)
@given(
    prompts=st.lists(st.tuples(VALUE, VALUE), min_size=1, max_size=8),
    labelled=st.lists(st.tuples(VALUE, LABEL), min_size=2, max_size=8),
    encoding=st.sampled_from(sorted(ENCODINGS)),
    ensure_ascii=st.booleans(),
)
def test_valid_rows_round_trip(prompts, labelled, encoding, ensure_ascii):
    cases = [
        ("causal-lm", [{"prompt": p, "completion": c} for p, c in prompts]),
        (
            "seq-cls",
            [{"text": t, "label": lab} for t, lab in labelled]
            + [
                {"text": "x", "label": "\x01distinct"}  # at least two labels
            ],
        ),
    ]
    encode = ENCODINGS[encoding]
    for task, rows in cases:
        assert parse_dataset(encode(_csv(rows)), fmt="csv", task=task) == rows
        assert parse_dataset(encode(_jsonl(rows, ensure_ascii)), fmt="jsonl", task=task) == rows


@settings(
    max_examples=30, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(depth=st.integers(min_value=9, max_value=200_000), opener=st.sampled_from("[{"))
def test_deep_json_is_refused_without_recursing(depth, opener):
    line = '{"text": "a", "label": "b", "x": ' + opener * depth
    try:
        parse_dataset(line.encode(), fmt="jsonl", task="seq-cls")
    except DatasetError as error:
        assert "nested deeper" in str(error)
    else:
        raise AssertionError("a deep line was accepted")
