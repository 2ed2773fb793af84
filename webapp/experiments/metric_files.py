"""A run's metric points as a file to download: CSV or Parquet, every stored point (full
resolution, not the chart's downsampled series of downsample.py), streamed.

Rows come from one server-side cursor (`.iterator(chunk_size=…)`; on PostgreSQL a named
cursor) in (key, step) order, the order of the unique (run, key, step) index, so the server
holds one chunk of rows for CSV, one row group for Parquet, however long the run. Columns:
step, key, value, wall_time (as stored: what the writer gave, seconds).
"""

import csv
import io
from collections.abc import Iterable, Iterator
from itertools import islice

from django.http import StreamingHttpResponse

from webapp.experiments.models import MetricPoint, Run

COLUMNS = ("step", "key", "value", "wall_time")
CHUNK_ROWS = 10_000  # rows fetched from the cursor at a time, and per CSV chunk sent
ROW_GROUP_ROWS = 100_000  # rows per Parquet row group: ~2 MB of columns in memory at most
FORMATS = {
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
}


def metric_rows(run: Run) -> Iterator[tuple]:
    """(step, key, value, wall_time) of every point of the run, by key then step."""
    points = MetricPoint.objects.filter(run_id=run.id).order_by("key", "step")
    return points.values_list(*COLUMNS).iterator(chunk_size=CHUNK_ROWS)


def _batches(rows: Iterable[tuple], size: int) -> Iterator[list[tuple]]:
    rows = iter(rows)
    while batch := list(islice(rows, size)):
        yield batch


def csv_chunks(rows: Iterable[tuple]) -> Iterator[bytes]:
    """The header, then one chunk of CSV per CHUNK_ROWS rows. Floats are written as Python's
    repr, the shortest text that reads back as the same double."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    yield buffer.getvalue().encode()
    for batch in _batches(rows, CHUNK_ROWS):
        buffer.seek(0)
        buffer.truncate()
        writer.writerows(batch)
        yield buffer.getvalue().encode()


class _Drain(io.RawIOBase):
    """A write-only file that keeps what was written until drained: where pyarrow's writer
    puts each row group, taken from it as the next chunk of the response."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def drain(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


def parquet_chunks(rows: Iterable[tuple]) -> Iterator[bytes]:
    """A Parquet file, one row group per ROW_GROUP_ROWS rows, each sent as it is written; the
    footer last. The key column is dictionary-encoded (few keys, many rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("step", pa.int64()),
            ("key", pa.string()),
            ("value", pa.float64()),
            ("wall_time", pa.float64()),
        ]
    )
    sink = _Drain()
    with pq.ParquetWriter(sink, schema) as writer:
        for batch in _batches(rows, ROW_GROUP_ROWS):
            columns = [list(column) for column in zip(*batch, strict=True)]
            writer.write_table(pa.table(columns, schema=schema), row_group_size=ROW_GROUP_ROWS)
            yield sink.drain()
    yield sink.drain()


def metrics_file_response(run: Run, fmt: str) -> StreamingHttpResponse:
    """The run's points as `fmt` (a key of FORMATS), streamed as an attachment."""
    chunks = csv_chunks if fmt == "csv" else parquet_chunks
    response = StreamingHttpResponse(chunks(metric_rows(run)), content_type=FORMATS[fmt])
    response["Content-Disposition"] = f'attachment; filename="peftlab-run-{run.id}-metrics.{fmt}"'
    response["X-Content-Type-Options"] = "nosniff"
    return response
