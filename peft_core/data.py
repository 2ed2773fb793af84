"""Datasets: parse uploads, split them, tokenize rows and batch them.

Row shapes (after `parse_dataset`, and of the built-in samples):
  causal-lm  {"prompt", "completion"}  loss on the completion only, or
             {"text"}                  loss on every token
  seq-cls    {"text", "label"}         label is a string; its index in
                                       `label_names(train_rows)` is the class id

Causal-LM formatting. With a chat template the prompt is the user message and the
completion the assistant reply; the boundary is where the rendered conversation
stops matching the rendered prompt-with-generation-prompt, so the loss covers
exactly the reply the model should produce. Without a template the prompt is
followed by a newline (unless it ends in whitespace) and the completion by eos.
Prompt and completion are tokenized separately, as at inference time, so the
boundary is exact for any tokenizer.

A batch is a dict of (B, T) tensors: input_ids, attention_mask, and labels,
which are (B, T) token ids with IGNORE_INDEX on prompt and padding for causal
LM, and (B,) class ids for seq-cls. Padding is on the right.
"""

import csv
import io
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from peft_core.tiny import TASKS

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips
FORMATS = ("csv", "jsonl")
MAX_ROWS = 100_000
MAX_VALUE_CHARS = 20_000
PROMPT_SEPARATOR = "\n"

TaskColumns = tuple[str, ...]
# Accepted column sets per task, in order of preference.
TASK_COLUMNS: dict[str, tuple[TaskColumns, ...]] = {
    "causal-lm": (("prompt", "completion"), ("text",)),
    "seq-cls": (("text", "label"),),
}


class DatasetError(ValueError):
    """A dataset problem a user can fix; the message names the line when there is one."""

    def __init__(self, message: str, *, line: int | None = None, column: str | None = None):
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line
        self.column = column


# --- parsing ---------------------------------------------------------------


def parse_dataset(
    data: bytes,
    *,
    fmt: str,
    task: str,
    max_rows: int = MAX_ROWS,
    max_value_chars: int = MAX_VALUE_CHARS,
) -> list[dict]:
    """Rows of a CSV (header line first) or JSONL upload, checked for `task`.

    Only the task's columns are kept; other columns are ignored. Raises
    DatasetError naming the 1-based line of the first problem.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _check_task(task)
    text = _decode(data)
    if not text.strip():
        raise DatasetError("the file is empty")
    records = _csv_records(text, task) if fmt == "csv" else _jsonl_records(text)
    rows = _checked_rows(records, task, max_rows, max_value_chars)
    if task == "seq-cls" and len(label_names(rows)) < 2:
        raise DatasetError(
            f"a classification dataset needs at least 2 labels, got {label_names(rows)}"
        )
    return rows


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # -sig: drop a byte-order mark that Excel writes
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DatasetError(f"not valid UTF-8 (byte {error.start})", line=line) from None


def _jsonl_records(text: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line."""
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as error:
            raise DatasetError(
                f"invalid JSON: {error.msg} (char {error.colno})", line=number
            ) from None
        if not isinstance(record, dict):
            raise DatasetError(f"expected a JSON object, got {type(record).__name__}", line=number)
        yield number, record


def _csv_records(text: str, task: str) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each CSV record; a quoted field may span lines."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader)]
        _check_header(header)
        _columns_for(dict.fromkeys(header), task, line=1)
        start = reader.line_num + 1
        for values in reader:
            if not any(value.strip() for value in values):
                start = reader.line_num + 1
                continue  # blank line
            if len(values) != len(header):
                raise DatasetError(
                    f"{len(values)} fields, but the header has {len(header)}", line=start
                )
            yield start, dict(zip(header, values, strict=True))
            start = reader.line_num + 1
    except csv.Error as error:
        raise DatasetError(f"invalid CSV: {error}", line=reader.line_num) from None


def _check_header(header: list[str]) -> None:
    if len(set(header)) != len(header):
        raise DatasetError(f"duplicate column names in header {header}", line=1)
    if any(not name for name in header):
        raise DatasetError("empty column name in header", line=1)


def _checked_rows(
    records: Iterator[tuple[int, dict]], task: str, max_rows: int, max_value_chars: int
) -> list[dict]:
    rows: list[dict] = []
    columns: TaskColumns | None = None
    for line, record in records:
        columns = columns or _columns_for(record, task, line)
        if len(rows) >= max_rows:
            raise DatasetError(f"too many rows: the limit is {max_rows}", line=line)
        rows.append({name: _checked_value(record, name, line, max_value_chars) for name in columns})
    if not rows:
        raise DatasetError("the file has no data rows")
    return rows


def _columns_for(record: dict, task: str, line: int) -> TaskColumns:
    """The task's column set that the first row provides."""
    options = TASK_COLUMNS[task]
    for columns in options:
        if all(name in record for name in columns):
            return columns
    wanted = " or ".join("+".join(columns) for columns in options)
    missing = next(name for name in options[0] if name not in record)
    message = f"missing column {missing!r} ({task} needs {wanted})"
    raise DatasetError(message, line=line, column=missing)


def _checked_value(record: dict, name: str, line: int, max_chars: int) -> str:
    if name not in record:
        raise DatasetError(f"missing column {name!r}", line=line, column=name)
    value = record[name]
    if name == "label" and isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)  # JSON labels 0/1 read like CSV labels "0"/"1"
    if not isinstance(value, str):
        kind = type(value).__name__
        raise DatasetError(f"column {name!r} must be a string, got {kind}", line=line, column=name)
    if not value.strip():
        raise DatasetError(f"empty value in column {name!r}", line=line, column=name)
    if len(value) > max_chars:
        message = f"value in column {name!r} is longer than {max_chars} characters"
        raise DatasetError(message, line=line, column=name)
    return value.strip() if name == "label" else value


# --- splitting and labels ---------------------------------------------------


def split_rows(
    rows: Sequence[dict], *, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """(train, validation), shuffled by `seed`; both non-empty when there are 2+ rows."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val_count = round(len(rows) * val_fraction)
    if val_fraction > 0 and len(rows) >= 2:
        val_count = min(max(val_count, 1), len(rows) - 1)
    train = [rows[index] for index in order[val_count:]]
    return train, [rows[index] for index in order[:val_count]]


def label_names(rows: Sequence[dict]) -> list[str]:
    """Sorted unique labels: position in this list is the class id."""
    return sorted({row["label"] for row in rows})


# --- tokenization -----------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One tokenized row: labels per token (causal LM) or one class id (seq-cls)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...] | int


def tokenize_rows(
    rows: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    max_length: int,
    labels: Sequence[str] | None = None,
) -> list[Example]:
    """Tokenize rows for `task`; seq-cls needs `labels` (the class names, in id order)."""
    _check_task(task)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if task == "seq-cls":
        if labels is None:
            raise ValueError("seq-cls tokenization needs the label names")
        class_ids = {name: index for index, name in enumerate(labels)}
        return [_classification_example(row, tokenizer, max_length, class_ids) for row in rows]
    return [_causal_example(row, tokenizer, max_length) for row in rows]


def _classification_example(
    row: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, class_ids: dict[str, int]
) -> Example:
    if row["label"] not in class_ids:
        raise DatasetError(
            f"label {row['label']!r} is not one of {sorted(class_ids)}", column="label"
        )
    ids = tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"]
    return Example(tuple(ids), class_ids[row["label"]])


def _causal_example(row: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Example:
    if "text" in row:  # plain text: learn every token
        ids = _with_eos(tokenizer, tokenizer(row["text"])["input_ids"])[:max_length]
        return Example(tuple(ids), tuple(ids))
    prompt_ids, completion_ids = _prompt_and_completion_ids(
        tokenizer, row["prompt"], row["completion"]
    )
    prompt_ids, completion_ids = _truncate_pair(prompt_ids, completion_ids, max_length)
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return Example(tuple(prompt_ids + completion_ids), tuple(labels))


def _prompt_and_completion_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str
) -> tuple[list[int], list[int]]:
    chat = _render_chat(tokenizer, prompt, completion)
    if chat is not None:  # the rendered chat already holds its special tokens
        prompt_ids = tokenizer(chat[0], add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(chat[1], add_special_tokens=False)["input_ids"]
    else:
        prompt_text = prompt if prompt[-1:].isspace() else prompt + PROMPT_SEPARATOR
        prompt_ids = tokenizer(prompt_text)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return prompt_ids, _with_eos(tokenizer, completion_ids)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The tokens a generation starts from: the prompt exactly as training formats it."""
    ids, _ = _prompt_and_completion_ids(tokenizer, prompt, "")
    return ids


def _with_eos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    """`ids` ending in eos somewhere in the answer, so the model learns to stop."""
    eos = tokenizer.eos_token_id
    return ids if eos is None or eos in ids else [*ids, eos]


def _render_chat(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str
) -> tuple[str, str] | None:
    """(prompt text, completion text) from the chat template, or None without a usable one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": completion}], tokenize=False
    )
    if not full.startswith(head):  # a template that rewrites earlier turns: use plain text
        return None
    return head, full[len(head) :]


def _truncate_pair(
    prompt_ids: list[int], completion_ids: list[int], max_length: int
) -> tuple[list[int], list[int]]:
    """Fit max_length, keeping at least half of it for the completion when it needs that.

    The prompt loses its start (the end is what the answer follows from); the
    completion loses its end.
    """
    if len(prompt_ids) + len(completion_ids) <= max_length:
        return prompt_ids, completion_ids
    completion_budget = max(max_length - len(prompt_ids), min(len(completion_ids), max_length // 2))
    completion_ids = completion_ids[:completion_budget]
    prompt_budget = max_length - len(completion_ids)
    return prompt_ids[len(prompt_ids) - prompt_budget :], completion_ids


# --- batching ---------------------------------------------------------------


def collate(examples: Sequence[Example], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids/attention_mask and labels ((B, T) or (B,))."""
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        attention_mask[row, : len(example.input_ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": _collate_labels(examples, width),
    }


def _collate_labels(examples: Sequence[Example], width: int) -> torch.Tensor:
    if isinstance(examples[0].labels, int):
        return torch.tensor([example.labels for example in examples], dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    return labels


def train_batches(
    examples: Sequence[Example], *, batch_size: int, pad_token_id: int, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches: epoch e is ordered by Random(seed + e), then the next starts.

    A batch never straddles two epochs, so the last batch of an epoch may be smaller.
    """
    if not examples:
        raise ValueError("no training examples")
    epoch = 0
    while True:
        order = list(range(len(examples)))
        random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            chunk = [examples[index] for index in order[start : start + batch_size]]
            yield collate(chunk, pad_token_id=pad_token_id)
        epoch += 1


def eval_batches(
    examples: Sequence[Example],
    *,
    batch_size: int,
    pad_token_id: int,
    max_batches: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in row order, each example once (the first max_batches batches, if given)."""
    for number, start in enumerate(range(0, len(examples), batch_size)):
        if max_batches is not None and number >= max_batches:
            return
        yield collate(examples[start : start + batch_size], pad_token_id=pad_token_id)
