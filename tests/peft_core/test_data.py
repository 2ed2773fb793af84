"""Dataset parsing, splitting, tokenization and batching."""

import codecs
import csv
import io
import json
from itertools import islice

import pytest
import torch

from peft_core.catalogue import build_byte_tokenizer
from peft_core.data import (
    IGNORE_INDEX,
    DatasetError,
    Example,
    collate,
    eval_batches,
    label_names,
    parse_dataset,
    read_dataset,
    split_rows,
    tokenize_rows,
    train_batches,
)


def jsonl(*objects) -> bytes:
    return "\n".join(json.dumps(obj) for obj in objects).encode()


# --- parsing --------------------------------------------------------------------


def test_jsonl_prompt_completion_rows():
    data = jsonl(
        {"prompt": "Add 1 and 2.", "completion": "3", "extra": 1},
        {"prompt": "p", "completion": "c"},
    )
    assert parse_dataset(data, fmt="jsonl", task="causal-lm") == [
        {"prompt": "Add 1 and 2.", "completion": "3"},
        {"prompt": "p", "completion": "c"},
    ]


def test_causal_lm_also_accepts_plain_text():
    data = b"text\nOnce upon a time\n"
    assert parse_dataset(data, fmt="csv", task="causal-lm") == [{"text": "Once upon a time"}]


def test_csv_classification_rows_with_a_bom_and_quoted_newlines():
    data = '\ufefftext,label\n"good, really",positive\n"two\nlines",negative\r\n'.encode()
    assert parse_dataset(data, fmt="csv", task="seq-cls") == [
        {"text": "good, really", "label": "positive"},
        {"text": "two\nlines", "label": "negative"},
    ]


def test_jsonl_numeric_labels_become_strings():
    rows = parse_dataset(
        jsonl({"text": "a", "label": 0}, {"text": "b", "label": 1}), fmt="jsonl", task="seq-cls"
    )
    assert label_names(rows) == ["0", "1"]


def test_blank_jsonl_lines_are_skipped_but_counted():
    data = b'{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n\n{"text": "c"}\n'
    with pytest.raises(DatasetError) as caught:
        parse_dataset(data, fmt="jsonl", task="seq-cls")
    assert (caught.value.line, caught.value.column) == (5, "label")
    assert str(caught.value) == "line 5: missing column 'label'"


def test_malformed_jsonl_line_names_the_line():
    data = b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": }\n'
    with pytest.raises(DatasetError, match=r"^line 2, column 31: invalid JSON: ") as caught:
        parse_dataset(data, fmt="jsonl", task="causal-lm")
    assert (caught.value.line, caught.value.char) == (2, 31)


def test_a_jsonl_line_must_be_an_object():
    with pytest.raises(DatasetError, match="line 1: expected a JSON object, got list"):
        parse_dataset(b'["text", "label"]\n', fmt="jsonl", task="seq-cls")


def test_csv_missing_column_names_the_header_line():
    with pytest.raises(DatasetError) as caught:
        parse_dataset(b"prompt,answer\nhi,there\n", fmt="csv", task="causal-lm")
    assert caught.value.column == "completion"
    assert str(caught.value).startswith("line 1: missing column 'completion'")


def test_csv_row_with_wrong_field_count_names_its_line():
    data = b'text,label\nfine,positive\n"multi\nline",negative\ntoo,many,fields\n'
    with pytest.raises(DatasetError, match="line 5: 3 fields, but the header has 2"):
        parse_dataset(data, fmt="csv", task="seq-cls")


@pytest.mark.parametrize(
    ("data", "fmt", "message"),
    [
        (b"", "jsonl", "the file is empty"),
        (b"\xef\xbb\xbf  \n\n", "csv", "the file is empty"),
        (b"text,label\n", "csv", "the file has no data rows"),
        (b"text,label\n   ,positive\n", "csv", "line 2: empty value in column 'text'"),
        (b'{"text": 5, "label": "a"}', "jsonl", "line 1: column 'text' must be a string, got int"),
        (b"text,label\na,x\nb,x\n", "csv", "at least 2 labels"),
        (b"text,text\na,b\n", "csv", "line 1: duplicate column names"),
        (b"text,label\nok,\xff\xfe\n", "csv", r"line 2, column 4: not valid UTF-8 \(byte 14\)"),
    ],
)
def test_bad_files_are_refused_with_a_clear_message(data, fmt, message):
    with pytest.raises(DatasetError, match=message):
        parse_dataset(data, fmt=fmt, task="seq-cls")


def test_row_and_value_limits():
    data = jsonl(*({"text": f"t{i}", "label": str(i % 2)} for i in range(5)))
    with pytest.raises(DatasetError, match="line 4: too many rows: the limit is 3"):
        parse_dataset(data, fmt="jsonl", task="seq-cls", max_rows=3)
    with pytest.raises(DatasetError, match="longer than 1 characters"):
        parse_dataset(data, fmt="jsonl", task="seq-cls", max_value_chars=1)


def test_unknown_format_or_task_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown format"):
        parse_dataset(b"x", fmt="xml", task="seq-cls")
    with pytest.raises(ValueError, match="unknown task"):
        parse_dataset(b"x", fmt="csv", task="summarise")


# --- hostile bytes --------------------------------------------------------------

ROWS = [{"text": "héllo, “world”", "label": "a"}, {"text": "second\nline", "label": "b"}]


def csv_bytes(rows) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["text", "label"])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


@pytest.mark.parametrize(
    "encode",
    [
        lambda text: text.encode("utf-8"),
        lambda text: codecs.BOM_UTF8 + text.encode("utf-8"),
        lambda text: codecs.BOM_UTF16_LE + text.encode("utf-16-le"),
        lambda text: codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
    ],
    ids=["utf-8", "utf-8-bom", "utf-16-le", "utf-16-be"],
)
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_utf8_and_utf16_with_a_bom_read_the_same(encode, fmt):
    text = csv_bytes(ROWS).decode() if fmt == "csv" else jsonl(*ROWS).decode()
    assert parse_dataset(encode(text), fmt=fmt, task="seq-cls") == ROWS


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("text,label\na,b\n".encode("utf-16-le"), r"line 1, column 2: NUL character"),
        (codecs.BOM_UTF32_LE + "text".encode("utf-32-le"), "line 1, column 1: UTF-32"),
        (b"text,label\nlatin,caf\xe9\n", r"line 2, column 10: not valid UTF-8 \(byte 20\)"),
        (codecs.BOM_UTF16_LE + b"t\x00\n\x00\x00\xdc", r"line 2, column 1: not valid UTF-16"),
        (codecs.BOM_UTF16_LE + b"t\x00\n", "not valid UTF-16"),  # odd length: truncated
        (b"text,label\na,b\x00c\n", r"line 2, column 4: NUL character"),
    ],
)
def test_other_encodings_and_nul_bytes_are_named_by_line_and_column(data, message):
    with pytest.raises(DatasetError, match=message):
        parse_dataset(data, fmt="csv", task="seq-cls")


def test_unicode_line_separators_inside_a_json_string_do_not_split_the_line():
    rows = [{"text": "a\u2028b\x85c", "label": "x"}, {"text": "d", "label": "y"}]
    data = "\n".join(json.dumps(row, ensure_ascii=False) for row in rows).encode()
    assert parse_dataset(data, fmt="jsonl", task="seq-cls") == rows


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "a", "label": "x", "text": "b"}', "line 1: duplicate key 'text'"),
        ('{"text": "a", "label": NaN}', "line 1: NaN is not valid JSON"),
        ('{"text": "a", "label": -Infinity}', "line 1: -Infinity is not valid JSON"),
        ('{"text": "a", "label": ' + "9" * 5000 + "}", "line 1: invalid JSON: Exceeds"),
        ('{"text": "\\u0000", "label": "x"}', "line 1: column 'text' holds a NUL"),
        ('{"text": "\\ud800", "label": "x"}', "line 1: column 'text' holds .* unpaired surrogate"),
        ('{"text": "a", "label": "x", "deep": ' + "[" * 9 + "]" * 9 + "}", "nested deeper than 8"),
        ("[" * 1_000_000, r"line 1, column 9: JSON nested deeper than 8 levels"),
        (
            '{"text": "a", "label": "x", "k": 1'
            + "".join(f', "k{i}": 1' for i in range(100))
            + "}",
            "more than 100 keys",
        ),
    ],
)
def test_hostile_json_lines_are_refused_by_line(line, message):
    with pytest.raises(DatasetError, match=message):
        parse_dataset(line.encode(), fmt="jsonl", task="seq-cls")


def test_brackets_inside_strings_and_shallow_nesting_are_fine():
    text = '[{"a": "]]]]]]]]]]]]]]]]\\"[[[[[[[[[[[[[["}]'
    row = {"text": text, "label": "x", "meta": {"a": [[[[{"b": [1]}]]]]}}
    data = jsonl(row, {"text": "t", "label": "y"})
    assert parse_dataset(data, fmt="jsonl", task="seq-cls")[0]["text"] == text


def test_csv_limits_name_the_line():
    wide = ",".join(["text", "label"] + [f"c{i}" for i in range(99)]) + "\n"
    with pytest.raises(DatasetError, match="line 1: 101 columns; the limit is 100"):
        parse_dataset(wide.encode(), fmt="csv", task="seq-cls")
    huge_field = b'text,label\n"' + b"x\n" * 70_000 + b'",a\n'
    with pytest.raises(DatasetError, match="invalid CSV: field larger than field limit"):
        parse_dataset(huge_field, fmt="csv", task="seq-cls")
    long_line = b"text,label\nok,a\n" + b"x" * 1_000_001 + b",b\n"
    with pytest.raises(DatasetError, match="line 3: the line is longer than 1,000,000"):
        parse_dataset(long_line, fmt="csv", task="seq-cls")


def test_duplicate_csv_headers_are_named_after_stripping():
    with pytest.raises(DatasetError, match=r"line 2: duplicate column names in header: 'text'"):
        parse_dataset(b"\ntext,label, text\na,b,c\n", fmt="csv", task="seq-cls")


def test_leading_blank_lines_before_the_csv_header_are_counted():
    with pytest.raises(DatasetError, match="line 4: missing column 'label'"):
        parse_dataset(b"\r\n\r\n\r\ntext,labels\na,x\n", fmt="csv", task="seq-cls")
    with pytest.raises(DatasetError, match="line 7: 1 fields, but the header has 2"):
        parse_dataset(b"\r\n\r\n\r\ntext,label\na,x\nb,y\nc\n", fmt="csv", task="seq-cls")


# --- streaming ------------------------------------------------------------------


@pytest.mark.parametrize("read_bytes", [1, 2, 3, 7])
@pytest.mark.parametrize(
    "encode",
    [
        lambda text: text.encode("utf-8"),
        lambda text: codecs.BOM_UTF8 + text.encode("utf-8"),
        lambda text: codecs.BOM_UTF16_LE + text.encode("utf-16-le"),
    ],
    ids=["utf-8", "utf-8-bom", "utf-16-le"],
)
def test_a_file_read_in_tiny_chunks_gives_the_same_rows_and_errors(monkeypatch, read_bytes, encode):
    """Chunk edges fall inside characters, inside \r\n and inside the BOM."""
    rows = [{"text": "héllo “wörld”", "label": "a"}, {"text": "two\r\nlines", "label": "b"}]
    text = csv_bytes(rows).decode() + "\r\rlast,b\r"  # csv ends its lines with \r\n
    monkeypatch.setattr("peft_core.data.READ_BYTES", read_bytes)
    source = io.BytesIO(encode(text))
    expected = [*rows, {"text": "last", "label": "b"}]
    assert list(read_dataset(source, fmt="csv", task="seq-cls")) == expected
    bad = b"text,label\r\nok,a\r\n\r\nfine,caf\xe9\n"
    with pytest.raises(DatasetError, match=r"line 4, column 9: not valid UTF-8 \(byte 28\)"):
        list(read_dataset(io.BytesIO(bad), fmt="csv", task="seq-cls"))


def test_rows_come_one_at_a_time_and_a_late_error_stops_the_stream():
    data = jsonl({"text": "a", "label": "x"}, {"text": "b", "label": "y"}) + b"\n{broken\n"
    rows = read_dataset(io.BytesIO(data), fmt="jsonl", task="seq-cls")
    assert next(rows) == {"text": "a", "label": "x"}
    assert next(rows) == {"text": "b", "label": "y"}
    with pytest.raises(DatasetError, match="line 3"):
        next(rows)


def test_an_endless_line_is_refused_before_it_is_read_whole(monkeypatch):
    """A file with no line break stops at MAX_LINE_CHARS plus a chunk, not at its end."""
    monkeypatch.setattr("peft_core.data.MAX_LINE_CHARS", 1000)
    monkeypatch.setattr("peft_core.data.READ_BYTES", 100)
    source = io.BytesIO(b"text,label\n" + b"x" * 1_000_000)
    with pytest.raises(DatasetError, match="line 2: the line is longer than 1,000"):
        list(read_dataset(source, fmt="csv", task="seq-cls"))
    assert source.tell() < 2000


# --- splitting ------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete():
    rows = [{"text": str(i), "label": "a"} for i in range(50)]
    train, validation = split_rows(rows, val_fraction=0.2, seed=3)
    assert (train, validation) == split_rows(rows, val_fraction=0.2, seed=3)
    assert len(validation) == 10
    assert sorted(row["text"] for row in train + validation) == sorted(row["text"] for row in rows)
    assert split_rows(rows, val_fraction=0.2, seed=4) != (train, validation)


def test_tiny_datasets_still_get_both_splits():
    rows = [{"text": "a"}, {"text": "b"}]
    train, validation = split_rows(rows, val_fraction=0.1)
    assert len(train) == len(validation) == 1
    train, validation = split_rows(rows, val_fraction=0)
    assert len(train) == 2 and validation == []
    with pytest.raises(ValueError):
        split_rows(rows, val_fraction=1.0)


# --- tokenization ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def byte_ids(text: str) -> list[int]:
    return [4 + byte for byte in text.encode()]


def test_causal_lm_loss_is_on_the_completion_and_eos_only(tokenizer):
    [example] = tokenize_rows(
        [{"prompt": "Hi", "completion": "yo"}], tokenizer, task="causal-lm", max_length=64
    )
    prompt_ids = [tokenizer.bos_token_id, *byte_ids("Hi\n")]
    completion_ids = [*byte_ids("yo"), tokenizer.eos_token_id]
    assert example.input_ids == tuple(prompt_ids + completion_ids)
    assert example.labels == tuple([IGNORE_INDEX] * len(prompt_ids) + completion_ids)


def test_prompt_ending_in_whitespace_gets_no_separator(tokenizer):
    [example] = tokenize_rows(
        [{"prompt": "Q: ", "completion": "A"}], tokenizer, task="causal-lm", max_length=64
    )
    assert (
        example.input_ids[1:4] == tuple(byte_ids("Q: "))
        and example.input_ids[4] == byte_ids("A")[0]
    )


def test_text_rows_learn_every_token(tokenizer):
    [example] = tokenize_rows([{"text": "abc"}], tokenizer, task="causal-lm", max_length=64)
    assert example.labels == example.input_ids == (1, *byte_ids("abc"), 2)


def test_truncation_keeps_the_end_of_the_prompt_and_some_completion(tokenizer):
    row = {"prompt": "p" * 50 + "END", "completion": "c" * 50}
    [example] = tokenize_rows([row], tokenizer, task="causal-lm", max_length=20)
    assert len(example.input_ids) == 20
    supervised = [label for label in example.labels if label != IGNORE_INDEX]
    assert len(supervised) == 10 and supervised[0] == byte_ids("c")[0]
    assert bytes(i - 4 for i in example.input_ids[:10]).endswith(b"END\n")


def test_chat_template_boundary_is_exact():
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    [example] = tokenize_rows(
        [{"prompt": "Hi", "completion": "yo"}], tokenizer, task="causal-lm", max_length=64
    )
    prompt_ids = [*byte_ids("<|user|>Hi"), 2, *byte_ids("<|assistant|>")]
    completion_ids = [*byte_ids("yo"), 2]  # the template's own </s> is the eos: not doubled
    assert example.input_ids == tuple(prompt_ids + completion_ids)
    assert example.labels == tuple([IGNORE_INDEX] * len(prompt_ids) + completion_ids)


def test_classification_rows_map_labels_to_ids(tokenizer):
    rows = [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}]
    examples = tokenize_rows(
        rows, tokenizer, task="seq-cls", max_length=3, labels=["negative", "positive"]
    )
    assert [example.labels for example in examples] == [1, 0]
    assert examples[0].input_ids == (1, *byte_ids("go"))  # truncated to max_length
    with pytest.raises(DatasetError, match="label 'neutral' is not one of"):
        tokenize_rows(
            [{"text": "x", "label": "neutral"}],
            tokenizer,
            task="seq-cls",
            max_length=8,
            labels=["a", "b"],
        )


# --- batching -------------------------------------------------------------------


def test_collate_pads_right_and_masks_labels():
    examples = [Example((5, 6, 7), (-100, 6, 7)), Example((8,), (8,))]
    batch = collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_collate_classification_labels_are_one_per_row():
    batch = collate([Example((5, 6), 1), Example((7,), 0)], pad_token_id=0)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]


def test_train_batches_cycle_epochs_deterministically():
    examples = [Example((i,), (i,)) for i in range(1, 6)]

    def first_rows(seed: int) -> list[list[int]]:
        batches = train_batches(examples, batch_size=2, pad_token_id=0, seed=seed)
        return [batch["input_ids"][:, 0].tolist() for batch in islice(batches, 6)]

    first = first_rows(7)
    assert first == first_rows(7)
    epoch_one, epoch_two = first[:3], first[3:]
    assert sorted(sum(epoch_one, [])) == sorted(sum(epoch_two, [])) == [1, 2, 3, 4, 5]
    assert epoch_one != epoch_two  # each epoch is reshuffled


def test_eval_batches_keep_row_order_and_stop():
    examples = [Example((i,), (i,)) for i in range(1, 6)]
    batches = list(eval_batches(examples, batch_size=2, pad_token_id=0))
    assert [b["input_ids"][:, 0].tolist() for b in batches] == [[1, 2], [3, 4], [5]]
    assert len(list(eval_batches(examples, batch_size=2, pad_token_id=0, max_batches=2))) == 2
