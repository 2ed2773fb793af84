"""Metrics in and out, the life of a run trained elsewhere, and artifact downloads."""

import hashlib

import pytest
from django.urls import reverse

from webapp.api import views as api_views
from webapp.experiments import artifacts, leases, metrics
from webapp.experiments.models import MetricPoint, Run, RunStatus

pytestmark = pytest.mark.django_db

BATCH = [
    {"key": "train_loss", "step": 1, "value": 2.5, "wall_time": 0.5},
    {"key": "train_loss", "step": 2, "value": 2.0},
    {"key": "eval/loss", "step": 2, "value": 2.2, "wall_time": 1.0},
]


def _external_run(cast, api) -> int:
    body = {
        "name": "trained elsewhere",
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "method": "lora",
        "train_config": {"steps": 100},
        "external": True,
    }
    response = api(cast.bob).post(reverse("api-runs"), body, format="json")
    assert response.status_code == 201
    return response.json()["id"]


def test_external_run_takes_metrics_once_then_finishes(cast, api):
    run_id, client = _external_run(cast, api), api(cast.bob)
    url = reverse("api-run-metrics", args=[run_id])
    for _ in range(2):  # a retried batch changes nothing
        response = client.post(url, {"points": BATCH}, format="json")
        assert response.status_code == 200 and response.json() == {"received": 3}
    assert MetricPoint.objects.filter(run_id=run_id).count() == 3
    assert MetricPoint.objects.get(run_id=run_id, key="train_loss", step=2).wall_time == 0.0
    run = client.get(reverse("api-run", args=[run_id])).json()
    assert (run["step"], run["progress"], run["latest"]["train_loss"]) == (2, 2, 2.0)

    finish = reverse("api-run-finish", args=[run_id])
    body = {"status": "succeeded", "summary": {"eval_loss": 2.2}}
    done = client.post(finish, body, format="json")
    assert done.status_code == 200
    assert (done.json()["status"], done.json()["summary"]) == ("succeeded", {"eval_loss": 2.2})
    assert done.json()["finished_at"] is not None
    late = client.post(
        url, {"points": [{"key": "train_loss", "step": 3, "value": 1.0}]}, format="json"
    )
    assert late.status_code == 409 and "succeeded" in late.json()["detail"]
    assert client.post(finish, {"status": "failed"}, format="json").status_code == 409
    assert MetricPoint.objects.filter(run_id=run_id).count() == 3


def test_a_workers_run_takes_no_ingest_nor_finish(cast, api, make_run):
    run = make_run(status=RunStatus.RUNNING)
    client = api(cast.bob)
    ingest = client.post(
        reverse("api-run-metrics", args=[run.id]), {"points": BATCH}, format="json"
    )
    assert ingest.status_code == 409 and "workers" in ingest.json()["detail"]
    finish = client.post(
        reverse("api-run-finish", args=[run.id]), {"status": "failed"}, format="json"
    )
    assert finish.status_code == 409
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING and not MetricPoint.objects.exists()


def test_a_viewer_cannot_ingest_or_finish(cast, api):
    run_id, client = _external_run(cast, api), api(cast.carol)
    assert (
        client.post(
            reverse("api-run-metrics", args=[run_id]), {"points": BATCH}, format="json"
        ).status_code
        == 403
    )
    assert (
        client.post(
            reverse("api-run-finish", args=[run_id]), {"status": "failed"}, format="json"
        ).status_code
        == 403
    )
    assert Run.objects.get(id=run_id).status == RunStatus.RUNNING


@pytest.mark.parametrize(
    "point",
    [
        {"key": "train_loss", "step": 1, "value": "NaN"},
        {"key": "train_loss", "step": 1, "value": "inf"},
        {"key": "train_loss", "step": -1, "value": 1.0},
        {"key": "train_loss", "step": 2**31, "value": 1.0},
        {"key": "train loss", "step": 1, "value": 1.0},
        {"key": "", "step": 1, "value": 1.0},
        {"key": "k" * 65, "step": 1, "value": 1.0},
        {"key": "train_loss", "step": 1, "value": 1.0, "wall_time": -1},
        {"key": "train_loss", "step": 1},
    ],
)
def test_bad_points_are_400_and_nothing_is_stored(cast, api, point):
    run_id = _external_run(cast, api)
    points = [BATCH[0], point]
    response = api(cast.bob).post(
        reverse("api-run-metrics", args=[run_id]), {"points": points}, format="json"
    )
    assert response.status_code == 400
    assert "points" in response.json()
    assert not MetricPoint.objects.exists()


def test_a_nan_literal_and_a_huge_batch_are_refused(cast, api):
    run_id, client = _external_run(cast, api), api(cast.bob)
    url = reverse("api-run-metrics", args=[run_id])
    literal = '{"points": [{"key": "train_loss", "step": 1, "value": NaN}]}'
    assert client.post(url, literal, content_type="application/json").status_code == 400
    huge = [{"key": "train_loss", "step": i, "value": 1.0} for i in range(10_001)]
    response = client.post(url, {"points": huge}, format="json")
    assert response.status_code == 400 and "points" in response.json()
    assert not MetricPoint.objects.exists()


def test_metric_series_are_downsampled_within_bounds(cast, api, make_run):
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w")
    points = [metrics.Point("train_loss", step, 1.0 / (step + 1), 0.0) for step in range(3000)]
    points += [metrics.Point("lr", step, 1e-3, 0.0) for step in range(10)]
    metrics.metrics_record(run_id=run.id, fence=fence, points=points)
    client, url = api(cast.carol), reverse("api-run-metrics", args=[run.id])

    every = client.get(url).json()["series"]
    assert set(every) == {"train_loss", "lr"}
    assert len(every["train_loss"]["step"]) <= 1000 and every["lr"]["step"] == list(range(10))
    few = client.get(url, {"keys": "train_loss", "max_points": 100}).json()["series"]
    assert list(few) == ["train_loss"]
    assert 50 <= len(few["train_loss"]["step"]) <= 100
    assert few["train_loss"]["step"][0] == 0 and few["train_loss"]["step"][-1] == 2999
    for params in ({"max_points": 9}, {"max_points": 10_001}, {"max_points": "x"}, {"keys": "a b"}):
        assert client.get(url, params).status_code == 400, params


def test_artifact_download_streams_the_stored_bytes(cast, api, make_run, monkeypatch):
    monkeypatch.setattr(artifacts, "CHUNK_BYTES", 1000)
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w")
    weights = bytes(range(256)) * 20  # 5 120 bytes: six chunks
    leases.artifact_store(
        run_id=run.id, fence=fence, kind="adapter", name="adapter_model.safetensors", data=weights
    )
    listing = api(cast.carol).get(reverse("api-run-artifacts", args=[run.id])).json()
    assert [(a["kind"], a["name"], a["size"]) for a in listing] == [
        ("adapter", "adapter_model.safetensors", 5120)
    ]
    assert listing[0]["sha256"] == hashlib.sha256(weights).hexdigest()
    small = api(cast.carol).get(listing[0]["download_url"])  # checked whole, then sent
    assert small.status_code == 200 and small.content == weights
    monkeypatch.setattr(api_views, "VERIFY_FIRST_BYTES", 1000)  # as if it were big: streamed
    response = api(cast.carol).get(listing[0]["download_url"])
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == weights
    assert response["Content-Type"] == "application/octet-stream"
    assert response["Content-Disposition"] == 'attachment; filename="adapter_model.safetensors"'
    assert response["Content-Length"] == "5120"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert api(cast.mallory).get(listing[0]["download_url"]).status_code == 404


def test_json_nested_past_the_recursion_limit_is_a_400(cast, api):
    run_id, client = _external_run(cast, api), api(cast.bob)
    url = reverse("api-run-metrics", args=[run_id])
    for body in ("[" * 100_000, '{"points": ' + "[" * 50_000 + "]" * 50_000 + "}"):
        response = client.post(url, body, content_type="application/json")
        assert response.status_code == 400 and "JSON" in response.json()["detail"]
    assert not MetricPoint.objects.exists()


def test_a_body_over_the_request_limit_is_a_413_unread(cast, api, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 64 * 1024
    run_id, client = _external_run(cast, api), api(cast.bob)
    points = [{"key": "train_loss", "step": i, "value": 1.0} for i in range(2000)]
    response = client.post(
        reverse("api-run-metrics", args=[run_id]), {"points": points}, format="json"
    )
    assert response.status_code == 413 and "larger than" in response.json()["detail"]
    assert not MetricPoint.objects.exists()


def test_a_batch_keeps_stored_points_and_drops_non_finite_ones(make_run):
    """Both paths (bulk_create on SQLite, COPY on PostgreSQL): the first value stored wins,
    and two runs' batches in one transaction stay apart."""
    first, second = make_run(), make_run(name="second")
    fences = {run.id: leases.run_claim(run_id=run.id, worker="w") for run in (first, second)}
    odd_keys = ["train_loss", 'a,"quoted"\tkey', "back\\slash", "ünï"]
    batch = [metrics.Point(key, 1, 1.0, 0.5) for key in odd_keys]
    batch += [metrics.Point("train_loss", 2, float("nan"), 0.5)]
    batch += [metrics.Point("train_loss", 3, float("inf"), 0.5)]
    assert metrics.metrics_record(run_id=first.id, fence=fences[first.id], points=batch) == 4
    again = [metrics.Point("train_loss", 1, 9.0, 9.0), metrics.Point("train_loss", 4, 0.25, 1)]
    assert metrics.metrics_record(run_id=first.id, fence=fences[first.id], points=again) == 2
    metrics.metrics_record(run_id=second.id, fence=fences[second.id], points=again[1:])
    stored = MetricPoint.objects.filter(run=first).values_list("key", "step", "value", "wall_time")
    assert sorted(stored) == sorted(
        [(key, 1, 1.0, 0.5) for key in odd_keys] + [("train_loss", 4, 0.25, 1.0)]
    )
    assert list(MetricPoint.objects.filter(run=second).values_list("step", flat=True)) == [4]
    with pytest.raises(leases.StaleFenceError):
        metrics.metrics_record(run_id=first.id, fence=fences[first.id] + 1, points=again)


@pytest.mark.django_db(transaction=True)
def test_postgresql_ingests_through_copy(cast, make_run, settings, monkeypatch):
    """The COPY path itself: the staging table is per connection and left empty after each
    commit. Runs wherever the suite runs on PostgreSQL (always in CI)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        if settings.REQUIRE_SERVICES:
            pytest.fail("CI runs the suite on PostgreSQL")
        pytest.skip("PostgreSQL only (set DATABASE_URL)")
    copies = []
    real_copy = metrics._metric_points_copy
    monkeypatch.setattr(
        metrics, "_metric_points_copy", lambda **kw: copies.append(kw) or real_copy(**kw)
    )
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w")
    points = [metrics.Point("train_loss", step, 1.0 / (step + 1), step) for step in range(5000)]
    for _ in range(2):
        assert metrics.metrics_record(run_id=run.id, fence=fence, points=points) == 5000
    assert len(copies) == 2 and MetricPoint.objects.filter(run=run).count() == 5000
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM metric_staging")
        assert cursor.fetchone() == (0,)


# ---- bounds: distinct keys per run, and the keys' pages --------------------------------------


def _points(keys, step: int = 1) -> list[dict]:
    return [{"key": key, "step": step, "value": 1.0} for key in keys]


def test_a_batch_past_the_key_cap_is_refused_whole_naming_it(cast, api, settings):
    settings.METRIC_KEYS_PER_RUN = 5
    run_id, client = _external_run(cast, api), api(cast.bob)
    url = reverse("api-run-metrics", args=[run_id])
    assert client.post(url, {"points": _points("abc")}, format="json").status_code == 200
    # 3 stored + 3 new: the whole batch refused, its known keys' points too.
    over = client.post(url, {"points": _points("abxyz", step=2)}, format="json")
    assert over.status_code == 400
    detail = over.json()["detail"]
    assert (
        "at most 5 distinct metric keys" in detail and "PEFTLAB_MAX_METRIC_KEYS_PER_RUN" in detail
    )
    assert "has 3" in detail and "3 new" in detail
    assert sorted(MetricPoint.objects.filter(run_id=run_id).values_list("key", "step")) == [
        ("a", 1),
        ("b", 1),
        ("c", 1),
    ]
    # Known keys always pass; new ones up to the cap; one more is refused.
    assert client.post(url, {"points": _points("abc", step=3)}, format="json").status_code == 200
    assert client.post(url, {"points": _points("de", step=3)}, format="json").status_code == 200
    assert client.post(url, {"points": _points("f", step=4)}, format="json").status_code == 400
    alone = client.post(url, {"points": _points("uvwxyz")}, format="json")  # over it by itself
    assert alone.status_code == 400 and "this batch brings 6 new" in alone.json()["detail"]
    keys = set(MetricPoint.objects.filter(run_id=run_id).values_list("key", flat=True))
    assert keys == set("abcde")


def test_a_workers_batches_are_capped_too(make_run, settings):
    settings.METRIC_KEYS_PER_RUN = 2
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w")
    record = [metrics.Point("train_loss", 1, 1.0, 0.0), metrics.Point("sys/rss_mib", 1, 9.0, 0.0)]
    assert metrics.metrics_record(run_id=run.id, fence=fence, points=record) == 2
    with pytest.raises(metrics.MetricKeysOverCap, match="at most 2"):
        metrics.metrics_record(
            run_id=run.id, fence=fence, points=[metrics.Point("eval_loss", 2, 1.0, 0.0)]
        )
    assert MetricPoint.objects.filter(run=run).count() == 2


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_batches_cannot_pass_the_cap_together(cast, make_run, settings, monkeypatch):
    """Each batch alone fits (6 new keys under a cap of 10); both would not. The first one to
    count holds the run's row lock until it commits: the second waits on that lock (seen in
    pg_stat_activity) and then counts the first one's keys. Without the lock both would count
    0 stored keys and store 12."""
    import threading
    import time

    from django.db import connection, connections

    if connection.vendor != "postgresql":
        if settings.REQUIRE_SERVICES:
            pytest.fail("CI runs the suite on PostgreSQL")
        pytest.skip("row locks: PostgreSQL only (set DATABASE_URL)")
    settings.METRIC_KEYS_PER_RUN = 10
    run = make_run(external=True, status=RunStatus.RUNNING)
    counted, release = [], threading.Event()
    real_check = metrics._metric_keys_check

    def check_then_wait(**kwargs):
        real_check(**kwargs)
        counted.append(kwargs["run_id"])
        assert release.wait(timeout=30)

    monkeypatch.setattr(metrics, "_metric_keys_check", check_then_wait)
    outcomes = []

    def send(prefix: str) -> None:
        points = [metrics.Point(f"{prefix}{i}", 1, 1.0, 0.0) for i in range(6)]
        try:
            metrics.metrics_ingest(user=cast.bob, run=run, points=points)
            outcomes.append("stored")
        except metrics.MetricKeysOverCap:
            outcomes.append("refused")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=send, args=(prefix,)) for prefix in ("a", "b")]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(counted) < 2 and not _waiting_on_a_lock():
        assert time.monotonic() < deadline, "neither batch counted nor waited"
        time.sleep(0.02)
    release.set()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["refused", "stored"]
    assert MetricPoint.objects.filter(run=run).values("key").distinct().count() == 6


def _waiting_on_a_lock() -> bool:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0] > 0


def test_all_keys_come_a_page_at_a_time_with_a_cursor(cast, api, make_run, settings):
    settings.METRIC_KEYS_PER_PAGE = 3
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w")
    keys = ["eval_loss", "lr", "sys/cpu_percent", "sys/rss_mib", "tokens", "train_loss", "x"]
    points = [metrics.Point(key, step, float(step), 0.0) for key in keys for step in range(4)]
    metrics.metrics_record(run_id=run.id, fence=fence, points=points)
    client, url = api(cast.carol), reverse("api-run-metrics", args=[run.id])
    pages, cursor = [], ""
    while cursor is not None:
        page = client.get(url, {"cursor": cursor} if cursor else {}).json()
        pages.append(sorted(page["series"]))
        cursor = page["next_cursor"]
    assert [len(page) for page in pages] == [3, 3, 1]
    assert sorted(key for page in pages for key in page) == keys
    assert all(
        page == sorted(page) and page[-1] < nxt[0]
        for page, nxt in zip(pages, pages[1:], strict=False)
    )
    named = client.get(url, {"keys": "x,lr,tokens,eval_loss"}).json()  # named: as many as asked
    assert len(named["series"]) == 4 and named["next_cursor"] is None
    assert named["series"]["x"] == {"step": [0, 1, 2, 3], "value": [0.0, 1.0, 2.0, 3.0]}
    both = client.get(url, {"keys": "x", "cursor": "lr"})
    assert both.status_code == 400 and "cursor" in both.json()
