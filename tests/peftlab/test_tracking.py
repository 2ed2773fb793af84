"""peftlab.init/log/finish against the real API, in process (conftest.py: the switch fixture): batching,
order, steps, validation, and the spool while the server is away (the transport refuses
connections as a stopped server does). test_tracking_live.py runs scripts against a real
server process."""

import json
import time

import pytest

from peftlab import spool, tracking
from peftlab.client import Client
from webapp.experiments.models import MetricPoint, Run

pytestmark = pytest.mark.django_db(transaction=True)
SERVER = "http://testserver"  # the switch fixture (conftest.py) carries requests to the app


def _init(**options) -> tracking.Run:
    defaults = {"project": "Default", "name": "own", "base_model": "gpt2", "method": "lora"}
    return tracking.init(**{**defaults, **options})


def _series(run_id: int, key: str) -> list[tuple[int, float]]:
    points = MetricPoint.objects.filter(run_id=run_id, key=key).order_by("step")
    return list(points.values_list("step", "value"))


def test_points_land_in_batches_with_the_summary_and_config(switch):
    run = _init(config={"learning_rate": 2e-4, "nested": {"r": 8}}, tags=["own"])
    for step in range(600):
        run.log({"train_loss": 1 / (step + 1), "custom/x": step})
    run.summary["eval_exact_match"] = 0.71
    run.finish()

    stored = Run.objects.get(id=run.id)
    assert stored.status == "succeeded" and stored.external
    assert stored.train_config == {"learning_rate": 2e-4, "nested": {"r": 8}}
    assert stored.summary == {"train_loss": 1 / 600, "custom/x": 599.0, "eval_exact_match": 0.71}
    assert _series(run.id, "custom/x") == [(step, float(step)) for step in range(600)]
    assert 1 <= switch.posts("/metrics/") <= 3  # 1,200 points in batches, not 600 requests
    assert switch.posts(f"/runs/{run.id}/finish/") == 1


def test_a_full_batch_goes_without_waiting_for_the_timer(switch, monkeypatch):
    monkeypatch.setattr(tracking, "BATCH_SECONDS", 60.0)
    run = _init()
    for _ in range(tracking.BATCH_POINTS // 2 + 10):
        run.log({"a": 1.0, "b": 2.0})
    # Sent by count, long before the 60 s timer; the run is still open.
    _wait_for(lambda: MetricPoint.objects.filter(run_id=run.id).count() >= tracking.BATCH_POINTS)
    assert Run.objects.get(id=run.id).status == "running"
    run.finish()
    assert len(_series(run.id, "b")) == tracking.BATCH_POINTS // 2 + 10


def test_steps_count_on_from_the_last_one_given(switch):
    run = _init()
    run.log({"a": 1})  # 0
    run.log({"a": 2})  # 1
    run.log({"a": 3}, step=10)
    run.log({"a": 4})  # 11
    tracking.finish()
    assert _series(run.id, "a") == [(0, 1.0), (1, 2.0), (10, 3.0), (11, 4.0)]


def test_keys_and_values_are_checked_as_the_server_checks_them(switch, caplog):
    run = _init()
    with pytest.raises(ValueError, match="metric key 'loss value'"):
        run.log({"loss value": 1.0})
    with pytest.raises(ValueError, match="metric key"):
        run.log({"x" * 65: 1.0})
    with pytest.raises(TypeError, match="train_loss: str is not a number"):
        run.log({"train_loss": "low"})
    with pytest.raises(ValueError, match="step must be"):
        run.log({"a": 1.0}, step=-1)
    run.log({"train_loss": float("nan"), "grad_norm": 2.0}, step=3)
    assert "train_loss is nan" in caplog.text
    run.finish()
    assert _series(run.id, "grad_norm") == [(3, 2.0)]
    assert _series(run.id, "train_loss") == []
    with pytest.raises(RuntimeError, match="finished"):
        run.log({"a": 1.0})


def test_a_context_manager_fails_the_run_on_an_exception(switch):
    with pytest.raises(ZeroDivisionError):
        with _init() as run:
            run.log({"a": 1.0})
            1 / 0  # noqa: B018
    assert Run.objects.get(id=run.id).status == "failed"


def test_points_logged_while_the_server_is_away_are_spooled_then_sent_by_the_thread(switch):
    run = _init()
    run.log({"a": 0.0})
    switch.down = True
    for step in range(1, 300):
        run.log({"a": float(step)})
    files = _wait_for(lambda: spool.spool_files())
    assert files and json.loads(files[0].read_text().splitlines()[0])["run"] == run.id
    switch.down = False
    _wait_for(lambda: not spool.spool_files())  # drained by the running SDK itself
    run.finish()
    assert _series(run.id, "a") == [(step, float(step)) for step in range(300)]
    assert Run.objects.get(id=run.id).status == "succeeded"


def test_a_finish_while_the_server_is_away_waits_for_peftlab_sync(switch, peftlab, caplog):
    run = _init()
    switch.down = True
    for step in range(50):
        run.log({"a": float(step)}, step=step)
    run.finish()
    assert "`peftlab sync` sends them" in caplog.text
    assert Run.objects.get(id=run.id).status == "running"
    [left] = spool.spool_files()

    switch.down = False
    result = peftlab("sync")
    assert result.code == 0, result.err
    assert f"run {run.id}: 50 points, finished succeeded sent" in result.out
    assert Run.objects.get(id=run.id).status == "succeeded"
    assert _series(run.id, "a") == [(step, float(step)) for step in range(50)]
    assert not left.exists() and not left.with_suffix(".sent").exists()
    assert "nothing to send" in peftlab("sync").out


def test_a_run_started_offline_is_created_by_sync(switch, peftlab):
    switch.down = True
    run = _init(name="offline", config={"max_steps": 5})
    assert run.id is None
    for step in range(5):
        run.log({"a": float(step)})
    run.finish()
    switch.down = False
    result = peftlab("sync")
    assert result.code == 0, result.err
    stored = Run.objects.get(name="offline")
    assert stored.status == "succeeded" and stored.total_steps == 5
    assert _series(stored.id, "a") == [(step, float(step)) for step in range(5)]


def test_sync_goes_on_from_where_it_stopped_and_sends_twice_harmlessly(switch, peftlab):
    run = _init()
    switch.down = True
    for step in range(40):
        run.log({"a": float(step)}, step=step)
    run.finish()
    [path] = spool.spool_files()
    # As if a first sync had sent the points, then stopped before recording so.
    switch.down = False
    with Client(SERVER, tracking._credentials(None, None)[1], transport=switch) as client:
        client.ingest_metrics(run.id, [{"key": "a", "step": s, "value": -1.0} for s in range(40)])
    assert peftlab("sync").code == 0
    assert _series(run.id, "a") == [(step, -1.0) for step in range(40)]  # kept as first stored
    assert Run.objects.get(id=run.id).status == "succeeded"
    assert not path.exists()


def test_sync_leaves_a_running_scripts_spool_alone(switch, peftlab):
    run = _init()
    switch.down = True
    run.log({"a": 1.0})
    _wait_for(lambda: spool.spool_files())
    switch.down = False
    result = peftlab("sync")
    assert result.code == 1 and "still running" in result.out
    run.finish()
    assert _series(run.id, "a") == [(0, 1.0)]


def test_sync_refuses_an_artifact_path_outside_the_spool(switch, peftlab, tmp_path):
    written = spool.Spool.create(SERVER, 1, tmp_path / "spool")
    written.append({"artifact": {"kind": "file", "path": "../../etc/passwd", "name": None}})
    written.close()
    result = peftlab("sync")
    assert result.code == 1 and "outside the spool" in result.out
    assert switch.requests == []  # refused before any request


def _wait_for(condition, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_a_refused_summary_still_finishes_the_run(switch, peftlab, caplog):
    live = _init(name="live")
    live.summary["notes"] = "x" * 100_001  # over the server's 100,000 characters
    live.finish()
    assert "refused run" in caplog.text and "summary" in caplog.text
    assert Run.objects.get(id=live.id).status == "succeeded"

    switch.down = True
    spooled = _init(name="spooled")
    spooled.summary["notes"] = "x" * 100_001
    spooled.finish()
    switch.down = False
    assert peftlab("sync").code == 0
    assert Run.objects.get(name="spooled").status == "succeeded"
