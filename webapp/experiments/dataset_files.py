"""A team's uploaded dataset as one file in the artifact store: its checked rows, as JSON lines.

An upload is read once (`dataset_file_write`): peft_core.data.read_dataset decodes, splits and
checks it a chunk at a time while the uploaded bytes are hashed, each row goes as one JSON line
to a temporary file, and only a file that passed every check is written to the store
(write-once, under a key made from the team id and a random part, never from the file's name).
Memory holds a chunk and a row whatever the upload's size, so DATASET_MAX_BYTES is a matter of
disk, not RAM.

Every read goes through the store's hashed stream (`dataset_chunks`, `dataset_rows`): bytes
that no longer match the size and sha256 recorded at upload raise DatasetDamaged, a
DatasetError, so a run fails for its dataset with the reason and the pages say so; damaged rows
are never trained on or shown.
"""

import hashlib
import json
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from peft_core.data import DatasetError, read_dataset
from webapp.experiments.models import Dataset
from webapp.experiments.store import (
    ArtifactDamaged,
    Stored,
    store_check,
    store_delete,
    store_stream,
    store_stream_range,
    store_write,
)

DAMAGED = "the dataset file is damaged"
SPOOL_BYTES = 1024 * 1024  # rows are written to the temporary file in batches this big
# Characters that str.splitlines() breaks on and json.dumps leaves raw: escaped, so that the
# stored JSON lines split back into exactly one row per line whichever way they are split.
LINE_BREAKS_ESCAPED = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class DatasetDamaged(DatasetError):
    """The stored rows are gone, or no longer match the size and sha256 written with them."""


@dataclass(frozen=True)
class DatasetFile:
    """What one pass over an upload learnt, and where its rows now are."""

    stored: Stored
    row_count: int
    columns: list[str]
    label_names: list[str]
    upload_sha256: str  # of the bytes as uploaded, before parsing
    val_row_count: int = 0  # the last rows, from a validation file


def dataset_store_key(*, team_id: int) -> str:
    """A fresh key for a team's dataset file: datasets/<team id>/<random>/rows.jsonl."""
    return f"datasets/{int(team_id)}/{uuid.uuid4().hex}/rows.jsonl"


def jsonl_line(row: dict) -> bytes:
    return json.dumps(row, ensure_ascii=False).translate(LINE_BREAKS_ESCAPED).encode() + b"\n"


def dataset_file_write(
    *,
    source: BinaryIO,
    fmt: str,
    task: str,
    team_id: int,
    max_bytes: int,
    max_rows: int,
    validation: tuple[BinaryIO, str] | None = None,
) -> DatasetFile:
    """Parse and check `source` in one pass and store its rows; DatasetError (naming the
    line) or a refusal over `max_bytes` leaves nothing stored.

    `validation` (a source and its format) is a validation file: checked the same way, its
    rows stored after the others (DatasetFile.val_row_count of them) with the same columns;
    the two files share max_bytes and max_rows.
    """
    upload = _CappedHashingReader(source, max_bytes=max_bytes)
    rows = _Rows(task)
    with tempfile.TemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR) as spool:
        rows.write(read_dataset(upload, fmt=fmt, task=task, max_rows=max_rows), spool)
        train_count = rows.count
        if validation is not None:
            checked = _CappedHashingReader(validation[0], max_bytes=max_bytes - upload.size)
            val_rows = read_dataset(
                checked,
                fmt=validation[1],
                task=task,
                max_rows=max_rows - train_count,
                min_labels=1,  # the training file has the labels
            )
            try:
                rows.write(val_rows, spool)
            except DatasetError as exc:
                raise DatasetError(f"the validation file: {exc}") from None
        spool.seek(0)
        stored = store_write(dataset_store_key(team_id=team_id), spool)
    return DatasetFile(
        stored,
        rows.count,
        rows.columns,
        sorted(rows.labels),
        upload.digest.hexdigest(),
        val_row_count=rows.count - train_count,
    )


class _Rows:
    """Checked rows on their way to the spool file: counted, their columns and labels kept."""

    def __init__(self, task: str) -> None:
        self.task, self.count = task, 0
        self.columns: list[str] = []
        self.labels: set[str] = set()

    def write(self, rows: Iterable[dict], spool) -> None:
        batch = bytearray()
        for row in rows:
            if self.columns and sorted(row) != self.columns:
                raise DatasetError(
                    f"its columns are {', '.join(sorted(row))}; the training file's are "
                    f"{', '.join(self.columns)}"
                )
            self.columns = self.columns or sorted(row)
            if self.task == "seq-cls":
                self.labels.add(row["label"])
            self.count += 1
            batch += jsonl_line(row)
            if len(batch) >= SPOOL_BYTES:
                spool.write(batch)
                batch.clear()
        spool.write(batch)


def dataset_check(dataset: Dataset) -> None:
    """Raise DatasetDamaged before a byte is sent when the file is gone or has another size."""
    if dataset.file_key:
        try:
            store_check(dataset.file_key, size=dataset.file_size)
        except ArtifactDamaged as exc:
            dataset_checked(dataset, damage=str(exc))
            raise DatasetDamaged(f"{DAMAGED} ({exc})") from None


def dataset_checked(dataset: Dataset, *, damage: str = "") -> None:
    """Record the outcome of a read of the whole file (or of a failed partial one)."""
    dataset.checked_at, dataset.damaged = timezone.now(), damage[:2000]
    Dataset.objects.filter(id=dataset.id).update(
        checked_at=dataset.checked_at, damaged=dataset.damaged
    )


def dataset_chunks(dataset: Dataset) -> Iterator[bytes]:
    """The stored JSON lines in chunks, hashed as they are read: the last chunk is held back
    and DatasetDamaged raised instead when the bytes do not match what was written."""
    if not dataset.file_key:
        return
    chunks = store_stream(dataset.file_key, size=dataset.file_size, sha256=dataset.file_sha256)
    try:
        yield from chunks
    except ArtifactDamaged as exc:
        dataset_checked(dataset, damage=str(exc))
        raise DatasetDamaged(f"{DAMAGED} ({exc}); upload it again") from None
    dataset_checked(dataset)


def _first_blocks(dataset: Dataset) -> Iterator[bytes]:
    """The file from its start, one block at a time, each checked against its own sha256
    before it is yielded: a reader that stops early reads (and checks) only what it used."""
    try:
        yield from store_stream_range(
            dataset.file_key,
            start=0,
            stop=dataset.file_size,
            size=dataset.file_size,
            blocks=dataset.file_blocks,
        )
    except ArtifactDamaged as exc:
        dataset_checked(dataset, damage=str(exc))
        raise DatasetDamaged(f"{DAMAGED} ({exc}); upload it again") from None


def dataset_rows(dataset: Dataset, *, limit: int | None = None) -> list[dict]:
    """An upload's rows. All of them only once the whole file has passed its sha256 check;
    the first `limit` once the blocks they lie in have passed theirs (a file stored before
    block digests existed is read whole). DatasetDamaged otherwise."""
    partial = limit is not None and bool(dataset.file_blocks) and dataset.file_size > 0
    rows: list[dict] = []
    unreadable = False
    lines = _lines(_first_blocks(dataset) if partial else dataset_chunks(dataset))
    for line in lines:
        if limit is not None and len(rows) >= limit:
            if partial:
                break  # the blocks read so far passed their check
            continue  # read on: the check is at the end
        if unreadable:
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:  # damage the stream will name once it reaches the end
            unreadable = True
            if partial:  # each block passed its check: the file was stored so
                break
    if unreadable:
        raise DatasetDamaged(f"{DAMAGED} (a stored row is not JSON); upload it again")
    return rows


def dataset_file_delete(key: str) -> None:
    """Delete a dataset's file once the deletion of its row is committed."""
    if key:
        transaction.on_commit(lambda: store_delete([key]), robust=True)


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Non-empty lines of a stream of chunks (a stored line never holds a raw \\n)."""
    tail = b""
    for chunk in chunks:
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        yield from (line for line in lines if line)
    if tail:
        yield tail


class _CappedHashingReader:
    """`source` read through: hashed, and refused past `max_bytes`."""

    def __init__(self, source: BinaryIO, *, max_bytes: int) -> None:
        self.source, self.max_bytes = source, max_bytes
        self.digest, self.size = hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.size += len(data)
        if self.size > self.max_bytes:
            raise DatasetError(f"the file is larger than {self.max_bytes:,} bytes")
        self.digest.update(data)
        return data
