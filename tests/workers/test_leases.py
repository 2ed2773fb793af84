"""Leases, fencing and the reaper, on the database: a run whose heartbeat stopped is marked
lost and sent again (or failed, out of attempts); the presumed-dead worker's writes are
refused; a lost run is claimed once; failures carry a class and advice."""

from datetime import timedelta

import pytest
import torch
from celery.exceptions import SoftTimeLimitExceeded
from django.urls import reverse
from django.utils import timezone

from peft_core.data import DatasetError
from peft_core.train import NonFiniteLossError
from webapp.celery import app as celery_app
from webapp.experiments import leases, metrics, queue, services
from webapp.experiments.leases import StaleFenceError
from webapp.experiments.metrics import Point
from webapp.experiments.models import Artifact, FailureClass, MetricPoint, Run, RunStatus
from webapp.experiments.reaper import Reaper, queue_length
from workers.training import RunConfigError, execute_run, failure_class_of

pytestmark = pytest.mark.django_db

LEASE_S = 30


RUN_QUEUE = queue.run_queue("any", 1)  # where a run of make_run goes


@pytest.fixture
def empty_queue():
    with celery_app.connection_for_write() as conn:
        conn.default_channel.queue_declare(RUN_QUEUE, durable=True, auto_delete=False)
        conn.default_channel.queue_purge(RUN_QUEUE)
    yield
    with celery_app.connection_for_write() as conn:
        conn.default_channel.queue_purge(RUN_QUEUE)


def _running(make_run, *, silent_for_s: float, attempt: int = 1) -> tuple[Run, int]:
    """A run claimed by worker w1 whose last heartbeat was `silent_for_s` ago."""
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w1:42")
    beat = timezone.now() - timedelta(seconds=silent_for_s)
    Run.objects.filter(id=run.id).update(heartbeat_at=beat, attempt=attempt)
    return run, fence


def _reap(max_attempts: int = 3) -> leases.Reaped:
    return leases.runs_reap(lease_s=LEASE_S, max_attempts=max_attempts)


def test_an_expired_lease_makes_the_run_lost_and_fences_the_old_worker_off(make_run):
    run, fence = _running(make_run, silent_for_s=LEASE_S + 1)
    alive, alive_fence = _running(make_run, silent_for_s=LEASE_S - 5)

    assert _reap() == leases.Reaped(lost=[run.id], failed=[])
    run.refresh_from_db()
    assert run.status == RunStatus.LOST and run.fence == fence + 1
    assert "worker w1:42 stopped sending heartbeats" in run.error
    assert "attempt 2 of 3" in run.error and run.log_lines()[-1].startswith("lost: ")

    # the presumed-dead worker wakes up: every write it tries is refused
    point = Point("train_loss", 7, 1.0, 0.0)
    with pytest.raises(StaleFenceError):
        metrics.metrics_record(run_id=run.id, fence=fence, points=[point])
    with pytest.raises(StaleFenceError):
        leases.run_heartbeat(run_id=run.id, fence=fence, step=7)
    with pytest.raises(StaleFenceError):
        leases.checkpoint_store(run_id=run.id, fence=fence, files={"a": b"x"})
    with pytest.raises(StaleFenceError):
        leases.run_finish(run_id=run.id, fence=fence, status=RunStatus.SUCCEEDED)
    assert not MetricPoint.objects.filter(run=run).exists()

    alive.refresh_from_db()
    assert (alive.status, alive.fence) == (RunStatus.RUNNING, alive_fence)


def test_a_lost_run_is_claimed_once_and_keeps_its_first_start(make_run):
    run, fence = _running(make_run, silent_for_s=LEASE_S + 1)
    started = Run.objects.get(id=run.id).started_at
    _reap()
    new_fence = leases.run_claim(run_id=run.id, worker="w2:7")
    assert new_fence == fence + 2  # one for the reaper, one for the claim
    assert leases.run_claim(run_id=run.id, worker="w3:8") is None  # the duplicate message
    run.refresh_from_db()
    assert (run.status, run.worker, run.attempt) == (RunStatus.RUNNING, "w2:7", 2)
    assert run.started_at == started and run.error == ""


def test_out_of_attempts_the_run_fails_as_worker_lost(make_run, client, cast):
    run, _ = _running(make_run, silent_for_s=LEASE_S + 1, attempt=3)
    assert _reap(max_attempts=3) == leases.Reaped(lost=[], failed=[run.id])
    run.refresh_from_db()
    assert (run.status, run.failure_class) == (RunStatus.FAILED, FailureClass.WORKER_LOST)
    assert "gave up after 3 attempts" in run.error and run.finished_at is not None

    client.force_login(cast.carol)
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert "Failed · Worker lost:" in page and "stopped sending heartbeats" in page


def test_cancelling_a_lost_run_ends_it_at_once(make_run, cast):
    run, _ = _running(make_run, silent_for_s=LEASE_S + 1)
    _reap()
    services.run_cancel_request(user=cast.bob, run=Run.objects.get(id=run.id))
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert leases.run_claim(run_id=run.id, worker="w2:7") is None


def test_the_reaper_judges_nobody_before_it_has_watched_a_whole_lease(
    make_run, published, empty_queue
):
    run, _ = _running(make_run, silent_for_s=LEASE_S + 1)
    reaper = Reaper(lease_s=LEASE_S, max_attempts=3, resend_after_s=600)
    assert reaper.tick(now=1000.0) is None  # just connected (after an outage, say)
    assert reaper.tick(now=1000.0 + LEASE_S - 1) is None
    assert Run.objects.get(id=run.id).status == RunStatus.RUNNING
    reaped = reaper.tick(now=1000.0 + LEASE_S)
    assert reaped == leases.Reaped(lost=[run.id], failed=[])
    assert published == [("peftlab.train_run", (run.id,))]
    assert queue_length(RUN_QUEUE) == 1


def test_the_reaper_sends_again_runs_that_wait_with_an_empty_queue(
    make_run, published, empty_queue
):
    waiting = make_run()
    fresh = make_run()
    Run.objects.filter(id=waiting.id).update(created_at=timezone.now() - timedelta(hours=1))
    reaper = Reaper(lease_s=LEASE_S, max_attempts=3, resend_after_s=600)
    reaper.connected_since = 0.0
    reaper.tick(now=LEASE_S)
    assert published == [("peftlab.train_run", (waiting.id,))]  # not the fresh one
    reaper.tick(now=LEASE_S + 10)  # its message waits in the queue now: no second copy
    assert published == [("peftlab.train_run", (waiting.id,))]
    assert Run.objects.get(id=fresh.id).status == RunStatus.QUEUED


@pytest.mark.parametrize(
    ("error", "failure"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "oom"),
        (MemoryError(), "oom"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB"), "oom"),
        (NonFiniteLossError("the loss was nan for 3 steps"), "non-finite"),
        (SoftTimeLimitExceeded(), "time-limit"),
        (DatasetError("row 3: missing column 'prompt'", line=3), "dataset"),
        (RunConfigError("r must be an integer"), "config"),
        (KeyError("boom"), "error"),
    ],
)
def test_failures_are_classified(error, failure):
    assert failure_class_of(error) == failure


def test_a_config_the_library_refuses_fails_as_config_with_advice(make_run, client, cast):
    run = make_run(train_config={"steps": 5, "learning_rate": 50.0})
    assert execute_run(run.id, worker="w1:1") == "failed"
    run.refresh_from_db()
    assert (run.status, run.failure_class) == (RunStatus.FAILED, FailureClass.CONFIG)
    assert "learning_rate" in run.error
    client.force_login(cast.carol)
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert "Failed · Invalid configuration:" in page and "the error says which" in page


def test_a_finished_run_keeps_no_checkpoint(make_run):
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w1:1")
    leases.checkpoint_store(run_id=run.id, fence=fence, files={"a.json": b"{}", "b": b"12"})
    assert leases.checkpoint_files(run_id=run.id) == {"a.json": b"{}", "b": b"12"}
    leases.checkpoint_store(run_id=run.id, fence=fence, files={"a.json": b"[]"})
    assert leases.checkpoint_files(run_id=run.id) == {"a.json": b"[]"}  # replaced whole
    leases.run_finish(run_id=run.id, fence=fence, status=RunStatus.SUCCEEDED)
    assert leases.checkpoint_files(run_id=run.id) == {}
    assert not Artifact.objects.filter(run=run).exists()


@pytest.mark.django_db(transaction=True)
def test_the_lease_thread_renews_until_the_run_is_taken_away(make_run):
    from workers.training import Lease

    run, fence = _running(make_run, silent_for_s=LEASE_S - 1)
    lease = Lease(run.id, fence, every_s=0.05)
    lease.start()
    try:
        deadline = timezone.now() + timedelta(seconds=10)
        while Run.objects.get(id=run.id).heartbeat_at < timezone.now() - timedelta(seconds=5):
            assert timezone.now() < deadline, "the lease was never renewed"
        assert _reap() == leases.Reaped(lost=[], failed=[])
        Run.objects.filter(id=run.id).update(cancel_requested=True)
        while not lease.cancel_requested:
            assert timezone.now() < deadline
        Run.objects.filter(id=run.id).update(status=RunStatus.LOST, fence=fence + 1)
        lease.join(timeout=10)
        assert lease.lost and not lease.is_alive()
    finally:
        lease.stop()


def test_no_code_revokes_or_terminates_a_task():
    """Cancel is a database flag the loop reads; killing a task mid-write is never done."""
    from django.conf import settings as django_settings

    offenders = [
        f"{path}:{number}"
        for folder in ("webapp", "workers", "peft_core", "peftlab")
        for path in sorted((django_settings.BASE_DIR / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "terminate=True" in line or ".revoke(" in line
    ]
    assert offenders == []


def test_long_job_settings_keep_a_run_from_being_delivered_twice(settings):
    """Redis hands an unacknowledged message to another worker after the visibility timeout:
    it must outlast the hard time limit, and settings refuse to start otherwise."""
    import subprocess
    import sys

    assert settings.CELERY_TASK_ACKS_LATE and settings.CELERY_WORKER_PREFETCH_MULTIPLIER == 1
    assert settings.CELERY_TASK_SOFT_TIME_LIMIT < settings.CELERY_TASK_TIME_LIMIT
    assert settings.CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS is False
    env = {
        "PATH": "/usr/bin:/bin",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
        "PEFTLAB_RUN_TIME_LIMIT_S": "7200",
        "PEFTLAB_VISIBILITY_TIMEOUT_S": "3600",
        "PEFTLAB_VAR_DIR": str(settings.VAR_DIR),
    }
    check = [sys.executable, "-c", "import webapp.settings"]
    result = subprocess.run(check, env=env, capture_output=True, text=True, cwd=settings.BASE_DIR)
    assert result.returncode != 0
    assert "PEFTLAB_VISIBILITY_TIMEOUT_S must exceed" in result.stderr
    env["PEFTLAB_VISIBILITY_TIMEOUT_S"] = "7600"
    result = subprocess.run(check, env=env, capture_output=True, text=True, cwd=settings.BASE_DIR)
    assert result.returncode == 0, result.stderr


def test_a_run_trained_elsewhere_has_no_lease_to_expire(cast):
    external = services.run_create_external(
        user=cast.bob,
        project=cast.acme_project,
        name="trained on my laptop",
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
        method="lora",
        method_config={},
        train_config={"steps": 10},
    )
    Run.objects.filter(id=external.id).update(started_at=timezone.now() - timedelta(hours=5))
    assert _reap() == leases.Reaped(lost=[], failed=[])
    assert leases.runs_unclaimed(older_than_s=0) == []
    assert Run.objects.get(id=external.id).status == RunStatus.RUNNING


def test_a_running_run_with_only_a_checkpoint_offers_no_adapter_download(make_run, client, cast):
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w1:1")
    leases.checkpoint_store(run_id=run.id, fence=fence, files={"checkpoint.json": b"{}"})
    client.force_login(cast.bob)
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert "Download adapter" not in page
    assert client.get(reverse("run_adapter_download", args=[run.id])).status_code == 404
