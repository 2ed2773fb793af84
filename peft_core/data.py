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

Uploads are hostile until checked. Bytes are UTF-8 (a BOM is dropped) or UTF-16 with its
BOM, decoded and split into lines as they are read; a line holds at most MAX_LINE_CHARS
characters and no NUL, a JSON line nests at most MAX_JSON_DEPTH deep (checked before json
recurses) with no duplicate key and no NaN, a file has at most MAX_COLUMNS columns and
`max_rows` rows, a kept value at most `max_value_chars` characters. Whatever the bytes,
`parse_dataset` returns rows or raises DatasetError naming the line and, when known, the column.

A batch is a dict of (B, T) tensors: input_ids, attention_mask, and labels,
which are (B, T) token ids with IGNORE_INDEX on prompt and padding for causal
LM, and (B,) class ids for seq-cls. Padding is on the right.

Packing (causal LM, `train_batches(..., pack_length=T)`): a row holds whole examples end to
end, as many as fit in T tokens in the epoch's shuffled order (the next example that does not
fit starts the next row), then padding. The batch also has position_ids (B, T), which restart
at 0 with every example (and with the padding after the last); labels are IGNORE_INDEX on
each example's first token, so the loss never asks an example's last token to predict the
next example's first. attention_mask is still 1 on every example token (what counts as
trained tokens); the model is given the position ids instead of it (peft_core.packing), and
transformers makes attention block-diagonal causal from their restarts, so each example sees
only itself, exactly as if it were alone in its row:

    input_ids     a0 a1 a2 b0 b1 c0 c1 c2 p  p        (a, b, c examples; p padding)
    position_ids  0  1  2  0  1  0  1  2  0  1
    labels        -  a1 a2 -  b1 -  c1 c2 -  -        (- IGNORE_INDEX; prompts too)

Evaluation is not packed (`eval_batches`): an example's loss is the same packed or not, but
eval_batches counts batches, and a packed batch holds more examples, so packed evaluation
would score another subset of the validation rows. Unpacked, a packed run and an unpacked
one are scored on the same supervised tokens, by the same token-weighted mean.

Importing this module loads neither torch nor transformers: the web parses uploads with
it. Only `collate` (and so the batch iterators) imports torch, when called.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips
FORMATS = ("csv", "jsonl")
MAX_ROWS = 100_000
MAX_VALUE_CHARS = 20_000
MAX_COLUMNS = 100
MAX_LINE_CHARS = 1_000_000
MAX_JSON_DEPTH = 8  # a row is an object of strings; extra columns may nest a little
BOMS = (
    (codecs.BOM_UTF8, "utf-8"),  # Excel writes it
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
READ_BYTES = 1024 * 1024  # an upload is decoded this many bytes at a time
LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what csv and open(newline="") end a line with
JSON_STRUCTURE = re.compile(r'[\[\]{}"\\]')
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
PROMPT_SEPARATOR = "\n"

TaskColumns = tuple[str, ...]
# Accepted column sets per task, in order of preference.
TASK_COLUMNS: dict[str, tuple[TaskColumns, ...]] = {
    "causal-lm": (("prompt", "completion"), ("text",)),
    "seq-cls": (("text", "label"),),
}
TASKS = tuple(TASK_COLUMNS)  # what a dataset, a model and a run can be for


class DatasetError(ValueError):
    """A problem with an upload that its author can fix.

    `line` is 1-based; `char` is the 1-based position in that line (shown as "column N", as
    editors count); `column` names the data column the problem is in, when there is one.
    """

    def __init__(
        self,
        message: str,
        *,
        line: int | None = None,
        column: str | None = None,
        char: int | None = None,
    ):
        where = f"line {line}" if line is not None else ""
        where += f", column {char}" if where and char is not None else ""
        super().__init__(f"{where}: {message}" if where else message)
        self.message = message
        self.line = line
        self.column = column
        self.char = char


# --- parsing ---------------------------------------------------------------


def parse_dataset(
    data: bytes,
    *,
    fmt: str,
    task: str,
    max_rows: int = MAX_ROWS,
    max_value_chars: int = MAX_VALUE_CHARS,
) -> list[dict]:
    """Rows of a CSV (header line first) or JSONL upload held in memory: `read_dataset`'s."""
    source = io.BytesIO(data)
    return list(
        read_dataset(source, fmt=fmt, task=task, max_rows=max_rows, max_value_chars=max_value_chars)
    )


def read_dataset(
    source: BinaryIO,
    *,
    fmt: str,
    task: str,
    max_rows: int = MAX_ROWS,
    max_value_chars: int = MAX_VALUE_CHARS,
    min_labels: int = 2,
) -> Iterator[dict]:
    """Rows of a CSV (header line first) or JSONL file, checked for `task`, one at a time.

    `source` is read once, READ_BYTES at a time, and decoded and split into lines as it goes,
    so memory holds a chunk and a line whatever the file's size. Only the task's columns are
    kept; other columns are ignored. Any problem with the bytes raises DatasetError naming
    the 1-based line (and the column, when it is known) of the first one; the checks that
    need every row (some rows, `min_labels` labels: a validation file may hold one) raise
    once the last row has been yielded.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _check_task(task)
    lines = _lines(source)
    records = _csv_records(lines, task) if fmt == "csv" else _jsonl_records(lines)
    labels: set[str] = set()
    for row in _checked_rows(records, task, max_rows, max_value_chars):
        if task == "seq-cls":
            labels.add(row["label"])
        yield row
    if task == "seq-cls" and len(labels) < min_labels:
        raise DatasetError(
            f"a classification dataset needs at least {min_labels} labels, got {sorted(labels)}"
        )


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def _shown(text: str) -> str:
    """`text` quoted for a message, cut short: a hostile name can be a megabyte long."""
    return repr(text if len(text) <= 40 else text[:40] + "…")


# --- lines: encoding, NUL, length -------------------------------------------


def _lines(source: BinaryIO) -> Iterator[str]:
    """Decoded lines, line endings kept (\n, \r\n or a lone \r, as csv expects), read
    incrementally from `source`; a line over MAX_LINE_CHARS is refused before it is whole."""
    head = source.read(len(codecs.BOM_UTF32_LE))
    encoding, bom = _encoding(head)
    decoder = codecs.getincrementaldecoder(encoding)()
    number, partial, fed, chunk = 1, "", 0, head[len(bom) :]
    while True:
        chunk += source.read(READ_BYTES)
        final = not chunk
        pending = len(decoder.getstate()[0])
        try:
            text = partial + decoder.decode(chunk, final)
        except UnicodeDecodeError as error:
            raise _decode_error(error, encoding, fed - pending, partial, number) from None
        fed, chunk, start = fed + len(chunk), b"", 0
        for match in LINE_BREAK.finditer(text):
            if match.end() == len(text) and match.group() == "\r" and not final:
                break  # perhaps the first half of a \r\n the next chunk completes
            line, start = text[start : match.end()], match.end()
            _check_line(line, number)
            yield line
            number += 1
        partial = text[start:]
        _check_line_length(partial, number)
        if final:
            if partial:
                _check_line(partial, number)
                yield partial
            return


def _encoding(data: bytes) -> tuple[str, bytes]:
    """(codec, byte-order mark) of an upload: UTF-8, with or without a BOM, or UTF-16 with one."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise DatasetError("UTF-32 is not supported; save the file as UTF-8", line=1, char=1)
    for bom, encoding in BOMS:
        if data.startswith(bom):
            return encoding, bom
    return "utf-8", b""


def _decode_error(
    error: UnicodeDecodeError, encoding: str, offset: int, partial: str, line: int
) -> DatasetError:
    """The error for an undecodable byte: `offset` is where the bytes the decoder failed on
    start in the body (after the BOM), `partial` the text of line `line` read before them."""
    before = partial + error.object[: error.start].decode(encoding, errors="replace")
    line += before.count("\n") + before.count("\r") - before.count("\r\n")
    char = len(before) - max(before.rfind("\n"), before.rfind("\r"))
    name = "UTF-8" if encoding == "utf-8" else "UTF-16"
    return DatasetError(f"not valid {name} (byte {offset + error.start})", line=line, char=char)


def _check_line(line: str, number: int) -> None:
    _check_line_length(line, number)
    nul = line.find("\x00")
    if nul >= 0:
        message = "NUL character (a UTF-16 file needs its byte-order mark)"
        raise DatasetError(message, line=number, char=nul + 1)


def _check_line_length(line: str, number: int) -> None:
    if len(line) > MAX_LINE_CHARS:
        raise DatasetError(f"the line is longer than {MAX_LINE_CHARS:,} characters", line=number)


# --- JSON lines --------------------------------------------------------------


def _jsonl_records(lines: Iterable[str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line."""
    empty = True
    for number, raw in enumerate(lines, start=1):
        if raw.strip():
            empty = False
            yield number, _json_object(raw, number)
    if empty:
        raise DatasetError("the file is empty")


def _json_object(raw: str, line: int) -> dict:
    _check_json_depth(raw, line)
    try:
        record = json.loads(raw, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise DatasetError(f"invalid JSON: {error.msg}", line=line, char=error.colno) from None
    except DatasetError as error:  # from the hooks, which do not know the line
        raise DatasetError(error.message, line=line, column=error.column) from None
    except ValueError as error:  # an integer of more than 4300 digits
        raise DatasetError(f"invalid JSON: {str(error)[:80]}", line=line) from None
    if not isinstance(record, dict):
        raise DatasetError(f"expected a JSON object, got {type(record).__name__}", line=line)
    if len(record) > MAX_COLUMNS:
        raise DatasetError(f"more than {MAX_COLUMNS} keys", line=line)
    return record


def _check_json_depth(raw: str, line: int) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH before json.loads recurses into it.

    Walks the brackets and quotes only, outside strings, and stops at the first bracket too
    deep, so a line of a million "[" costs MAX_JSON_DEPTH steps.
    """
    if raw.count("[") + raw.count("{") <= MAX_JSON_DEPTH:
        return  # too few brackets to nest that deep
    depth, in_string, escaped_at = 0, False, -1
    for match in JSON_STRUCTURE.finditer(raw):
        char, at = match.group(), match.start()
        if in_string:
            if at == escaped_at:
                continue
            if char == "\\":
                escaped_at = at + 1
            in_string = char != '"'
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                message = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
                raise DatasetError(message, line=line, char=at + 1)
        elif char in "]}":
            depth -= 1


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    record = dict(pairs)
    if len(record) < len(pairs):
        seen: set[str] = set()
        key = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise DatasetError(f"duplicate key {_shown(key)}", column=key)
    return record


def _no_constant(name: str) -> None:
    raise DatasetError(f"{name} is not valid JSON; write a number or a string")


# --- CSV ---------------------------------------------------------------------


def _csv_records(lines: Iterable[str], task: str) -> Iterator[tuple[int, dict]]:
    """(first line, row) for each CSV record after the header; a quoted field may span lines."""
    reader = csv.reader(lines)
    records = _csv_nonblank(reader)
    try:
        line, names = next(records, (0, None))
        if names is None:
            raise DatasetError("the file is empty")
        header = _checked_header(names, task, line)
        for line, values in records:
            if len(values) != len(header):
                message = f"{len(values)} fields, but the header has {len(header)}"
                raise DatasetError(message, line=line)
            yield line, dict(zip(header, values, strict=True))
    except csv.Error as error:  # e.g. a field over csv.field_size_limit()
        raise DatasetError(f"invalid CSV: {error}", line=reader.line_num) from None


def _csv_nonblank(reader) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of each record that is not blank."""
    start = 1
    for values in reader:
        if any(value.strip() for value in values):
            yield start, values
        start = reader.line_num + 1


def _checked_header(names: list[str], task: str, line: int) -> list[str]:
    header = [name.strip() for name in names]
    if len(header) > MAX_COLUMNS:
        raise DatasetError(f"{len(header)} columns; the limit is {MAX_COLUMNS}", line=line)
    if any(not name for name in header):
        raise DatasetError("empty column name in header", line=line)
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        shown = ", ".join(_shown(name) for name in duplicates[:5])
        raise DatasetError(f"duplicate column names in header: {shown}", line=line)
    _columns_for(dict.fromkeys(header), task, line)
    return header


# --- rows --------------------------------------------------------------------


def _checked_rows(
    records: Iterator[tuple[int, dict]], task: str, max_rows: int, max_value_chars: int
) -> Iterator[dict]:
    count = 0
    columns: TaskColumns | None = None
    for line, record in records:
        columns = columns or _columns_for(record, task, line)
        if count >= max_rows:
            raise DatasetError(f"too many rows: the limit is {max_rows}", line=line)
        count += 1
        yield {name: _checked_value(record, name, line, max_value_chars) for name in columns}
    if not count:
        raise DatasetError("the file has no data rows")


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
    if UNSTORABLE.search(value):  # only a JSON escape (\u0000, \ud800) can put these here
        message = f"column {name!r} holds a NUL or an unpaired surrogate"
        raise DatasetError(message, line=line, column=name)
    return value.strip() if name == "label" else value


# --- splitting and labels ---------------------------------------------------


def split_rows(
    rows: Sequence[dict], *, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """(train, validation), shuffled by `seed`; both non-empty when there are 2+ rows."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val_count = validation_size(len(rows), val_fraction=val_fraction)
    train = [rows[index] for index in order[val_count:]]
    return train, [rows[index] for index in order[:val_count]]


def validation_size(rows: int, *, val_fraction: float) -> int:
    """How many of `rows` rows split_rows holds out: round(rows · val_fraction), at least one
    and at most rows − 1 when there are 2 or more rows and a fraction above 0."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    count = round(rows * val_fraction)
    if val_fraction > 0 and rows >= 2:
        count = min(max(count, 1), rows - 1)
    return count


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
    import torch  # here, not at the top: the web parses datasets with this module, torch-free

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
    import torch  # see collate

    if isinstance(examples[0].labels, int):
        return torch.tensor([example.labels for example in examples], dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    return labels


def train_batches(
    examples: Sequence[Example],
    *,
    batch_size: int,
    pad_token_id: int,
    seed: int = 0,
    skip: int = 0,
    pack_length: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches: epoch e is ordered by Random(seed + e), then the next starts.

    A batch never straddles two epochs, so the last batch of an epoch may be smaller.
    The stream starts after its first `skip` batches, which are not built: a run resumed
    after step k trains on exactly the batches the uninterrupted run saw after step k.
    With `pack_length`, a batch is `batch_size` packed rows of up to pack_length tokens
    (module docstring), made from the same epoch orders.
    """
    if not examples:
        raise ValueError("no training examples")
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    if pack_length is not None:
        yield from _packed_batches(examples, batch_size, pad_token_id, seed, skip, pack_length)
        return
    batches_per_epoch = -(-len(examples) // batch_size)  # ceil
    epoch, first_batch = divmod(skip, batches_per_epoch)
    while True:
        order = list(range(len(examples)))
        random.Random(seed + epoch).shuffle(order)
        for start in range(first_batch * batch_size, len(order), batch_size):
            chunk = [examples[index] for index in order[start : start + batch_size]]
            yield collate(chunk, pad_token_id=pad_token_id)
        epoch, first_batch = epoch + 1, 0


def _packed_batches(
    examples: Sequence[Example],
    batch_size: int,
    pad_token_id: int,
    seed: int,
    skip: int,
    pack_length: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """train_batches' stream of packed batches. How many rows an epoch packs depends on its
    order, so skipped epochs are packed (lengths only: no tensors) to be counted."""
    epoch = 0
    while True:
        order = list(range(len(examples)))
        random.Random(seed + epoch).shuffle(order)
        rows = pack_examples([examples[index] for index in order], pack_length)
        starts = range(0, len(rows), batch_size)
        for start in starts[skip:]:
            yield collate_packed(rows[start : start + batch_size], pad_token_id=pad_token_id)
        skip = max(0, skip - len(starts))
        epoch += 1


def pack_examples(examples: Sequence[Example], pack_length: int) -> list[tuple[Example, ...]]:
    """Whole examples in their order, grouped into rows of at most pack_length tokens: an
    example that does not fit in the current row starts the next (next fit; never split,
    so each keeps its context)."""
    rows: list[tuple[Example, ...]] = []
    row: list[Example] = []
    used = 0
    for example in examples:
        if isinstance(example.labels, int):
            raise ValueError("packing is for causal LM examples, not classification")
        size = len(example.input_ids)
        if size > pack_length:
            raise ValueError(f"an example of {size} tokens does not fit a row of {pack_length}")
        if used + size > pack_length:
            rows.append(tuple(row))
            row, used = [], 0
        row.append(example)
        used += size
    if row:
        rows.append(tuple(row))
    return rows


def collate_packed(
    rows: Sequence[Sequence[Example]], *, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids, attention_mask, labels and position_ids of packed rows,
    as the module docstring draws them."""
    import torch  # see collate

    flat = [_packed_row(row) for row in rows]
    width = max(len(ids) for ids, _, _ in flat)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for index, (ids, row_labels, positions) in enumerate(flat):
        size = len(ids)
        input_ids[index, :size] = torch.tensor(ids)
        attention_mask[index, :size] = 1
        labels[index, :size] = torch.tensor(row_labels)
        position_ids[index, :size] = torch.tensor(positions)
        position_ids[index, size:] = torch.arange(width - size)  # the padding: a block of its own
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
    }


def _packed_row(row: Sequence[Example]) -> tuple[list[int], list[int], list[int]]:
    """(input ids, labels, position ids) of one row's examples end to end."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in row:
        ids += example.input_ids
        labels += [IGNORE_INDEX, *example.labels[1:]]  # never predicted from the example before
        positions += range(len(example.input_ids))
    return ids, labels, positions


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
