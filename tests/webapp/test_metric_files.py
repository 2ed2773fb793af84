"""A run's metrics as CSV and Parquet (webapp/experiments/metric_files.py): every stored point,
from the run page, the API and a share link; another team's run is 404; streamed from a
server-side cursor."""

import csv
import io
import math

import pyarrow.parquet as pq
import pytest
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from webapp.accounts.services import api_token_create
from webapp.experiments import leases, metric_files, metrics
from webapp.experiments.models import ShareLink

pytestmark = pytest.mark.django_db

STEPS = 3000  # long enough that the charts downsample it (to ~1000), the files do not


@pytest.fixture
def run_points(make_run):
    """A run with 3,000 train_loss points, a few eval points and a sys/ series, as a worker
    stores them; the points as (step, key, value, wall_time), by key then step."""
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w")
    points = [
        metrics.Point("train_loss", s, 2.0 / (s + 1) + 1e-17 * s, 1e9 + s) for s in range(STEPS)
    ]
    points += [
        metrics.Point("eval_loss", s, math.pi * s, 1e9 + s + 0.5) for s in range(0, STEPS, 500)
    ]
    points += [metrics.Point("sys/rss_mib", s, 431.25, 1e9 + s) for s in (1, 2)]
    metrics.metrics_record(run_id=run.id, fence=fence, points=points)
    expected = sorted((p.step, p.key, p.value, p.wall_time) for p in points)
    return run, sorted(expected, key=lambda row: (row[1], row[0]))


def _csv_rows(body: bytes) -> list[tuple]:
    reader = csv.reader(io.StringIO(body.decode()))
    assert next(reader) == ["step", "key", "value", "wall_time"]
    return [(int(step), key, float(value), float(wall)) for step, key, value, wall in reader]


def _parquet_rows(body: bytes) -> list[tuple]:
    table = pq.read_table(io.BytesIO(body))
    assert table.column_names == ["step", "key", "value", "wall_time"]
    return [tuple(row.values()) for row in table.to_pylist()]


def test_member_downloads_every_point_as_csv_and_parquet(client, cast, run_points):
    run, expected = run_points
    client.force_login(cast.carol)  # a viewer may read
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    csv_url, parquet_url = (reverse(f"run_metrics_{f}", args=[run.id]) for f in ("csv", "parquet"))
    assert f'href="{csv_url}" download' in page and f'href="{parquet_url}" download' in page
    as_csv = client.get(csv_url)
    assert as_csv.status_code == 200 and as_csv.streaming
    assert as_csv["Content-Type"] == "text/csv; charset=utf-8"
    assert (
        as_csv["Content-Disposition"] == f'attachment; filename="peftlab-run-{run.id}-metrics.csv"'
    )
    assert _csv_rows(b"".join(as_csv.streaming_content)) == expected  # exact: repr round-trips
    as_parquet = client.get(parquet_url)
    assert as_parquet.status_code == 200 and as_parquet.streaming
    assert as_parquet["Content-Type"] == "application/vnd.apache.parquet"
    assert _parquet_rows(b"".join(as_parquet.streaming_content)) == expected
    client.force_login(cast.mallory)
    assert client.get(csv_url).status_code == 404
    assert client.get(parquet_url).status_code == 404


def _api(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_token_create(user=user, name='t')[1]}")
    return client


def test_the_api_serves_both_files_to_the_team_only(cast, run_points):
    run, expected = run_points
    api = _api
    for fmt, read in (("csv", _csv_rows), ("parquet", _parquet_rows)):
        url = reverse(f"api-run-metrics-{fmt}", args=[run.id])
        response = api(cast.carol).get(url, HTTP_ACCEPT=metric_files.FORMATS[fmt])
        assert response.status_code == 200 and response.streaming
        assert read(b"".join(response.streaming_content)) == expected
        refused = api(cast.mallory).get(url, HTTP_ACCEPT=metric_files.FORMATS[fmt])
        assert refused.status_code == 404 and "detail" in refused.json()
    schema = api(cast.carol).get(reverse("api-schema")).content.decode()
    assert "/api/v1/runs/{run_id}/metrics.csv" in schema
    assert "/api/v1/runs/{run_id}/metrics.parquet" in schema


def test_a_share_link_downloads_what_its_page_charts(client, cast, run_points):
    run, expected = run_points
    client.force_login(cast.bob)
    response = client.post(reverse("run_share", args=[run.id]), {"days": "7"})
    secret = response.content.decode().split("/s/")[1].split("/")[0]
    stranger = Client()
    page = stranger.get(reverse("share_view", args=[secret])).content.decode()
    csv_url = reverse("share_metrics_csv", args=[secret])
    assert f'href="{csv_url}" download' in page
    shared = stranger.get(csv_url)
    assert shared["Referrer-Policy"] == "no-referrer"
    assert _csv_rows(b"".join(shared.streaming_content)) == expected
    parquet = stranger.get(reverse("share_metrics_parquet", args=[secret]))
    assert _parquet_rows(b"".join(parquet.streaming_content)) == expected
    client.post(reverse("share_link_revoke", args=[ShareLink.objects.get().id]))
    assert stranger.get(csv_url).status_code == 404


def test_an_empty_run_gives_a_header_and_an_empty_table(client, cast, make_run):
    run = make_run()
    client.force_login(cast.bob)
    as_csv = client.get(reverse("run_metrics_csv", args=[run.id]))
    assert b"".join(as_csv.streaming_content) == b"step,key,value,wall_time\n"
    as_parquet = client.get(reverse("run_metrics_parquet", args=[run.id]))
    assert _parquet_rows(b"".join(as_parquet.streaming_content)) == []


def test_rows_stream_from_a_server_side_cursor_a_chunk_at_a_time(
    client, cast, run_points, monkeypatch, settings
):
    """Memory stays bounded: the first chunk is sent while the rest wait in the database's
    cursor (seen in pg_cursors), each CSV chunk holds CHUNK_ROWS rows, and the Parquet file
    is written one row group of ROW_GROUP_ROWS at a time."""
    from django.db import connection

    if connection.vendor != "postgresql":
        if settings.REQUIRE_SERVICES:
            pytest.fail("CI runs the suite on PostgreSQL")
        pytest.skip("server-side cursors: PostgreSQL only (set DATABASE_URL)")
    run, expected = run_points
    monkeypatch.setattr(metric_files, "CHUNK_ROWS", 500)
    monkeypatch.setattr(metric_files, "ROW_GROUP_ROWS", 1000)
    client.force_login(cast.bob)
    chunks = iter(client.get(reverse("run_metrics_csv", args=[run.id])).streaming_content)
    header, first = next(chunks), next(chunks)
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_cursors WHERE name LIKE '_django_curs_%%'")
        assert cursor.fetchone()[0] == 1  # the rest of the rows wait in it
    rest = list(chunks)
    assert first.count(b"\n") == 500 and len(rest) == math.ceil(len(expected) / 500) - 1
    assert _csv_rows(header + first + b"".join(rest)) == expected
    parquet = client.get(reverse("run_metrics_parquet", args=[run.id]))
    body = b"".join(parquet.streaming_content)
    assert pq.ParquetFile(io.BytesIO(body)).num_row_groups == math.ceil(len(expected) / 1000)
