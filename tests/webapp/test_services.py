"""The claim and the fence: one worker owns a run; a stale worker's writes change nothing."""

import pytest
from django.utils import timezone

from peft_core.configs import EVAL_SECONDS
from webapp.experiments import leases, metrics, services
from webapp.experiments.leases import StaleFenceError
from webapp.experiments.metrics import Point
from webapp.experiments.models import MetricPoint, Run, RunStatus

pytestmark = pytest.mark.django_db


@pytest.fixture
def run(cast) -> Run:
    return Run.objects.create(
        project=cast.acme_project,
        name="r",
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
        method="lora",
        total_steps=10,
    )


def test_second_claim_finds_the_run_taken(run):
    assert leases.run_claim(run_id=run.id, worker="a") == 1
    assert leases.run_claim(run_id=run.id, worker="b") is None
    run.refresh_from_db()
    assert (run.status, run.worker, run.attempt, run.fence) == (RunStatus.RUNNING, "a", 1, 1)


def test_stale_fence_is_refused_everywhere(run):
    fence = leases.run_claim(run_id=run.id, worker="a")
    Run.objects.filter(id=run.id).update(fence=fence + 1)  # another claim took it over
    stale = {"run_id": run.id, "fence": fence}
    with pytest.raises(StaleFenceError):
        leases.run_heartbeat(**stale, step=3)
    with pytest.raises(StaleFenceError):
        metrics.metrics_record(**stale, points=[Point("train_loss", 1, 1.0, 0.0)])
    with pytest.raises(StaleFenceError):
        leases.artifact_store(**stale, kind="adapter", name="x", data=b"x")
    with pytest.raises(StaleFenceError):
        leases.run_finish(**stale, status=RunStatus.SUCCEEDED)
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING and run.step == 0
    assert not MetricPoint.objects.exists() and not run.artifacts.exists()


def test_metric_points_are_idempotent_per_step(run):
    fence = leases.run_claim(run_id=run.id, worker="a")
    points = [Point("train_loss", step, 1.0 / step, 0.0) for step in (1, 2, 3)]
    metrics.metrics_record(run_id=run.id, fence=fence, points=points)
    metrics.metrics_record(run_id=run.id, fence=fence, points=points)
    assert MetricPoint.objects.filter(run=run).count() == 3


def test_heartbeat_reports_a_cancel(run, cast):
    fence = leases.run_claim(run_id=run.id, worker="a")
    assert leases.run_heartbeat(run_id=run.id, fence=fence, step=1) is False
    services.run_cancel_request(user=cast.bob, run=run)
    assert leases.run_heartbeat(run_id=run.id, fence=fence, step=2) is True


def test_log_keeps_the_last_lines(run, settings):
    settings.RUN_LOG_LINES = 3
    fence = leases.run_claim(run_id=run.id, worker="a")
    leases.run_log_append(run_id=run.id, fence=fence, lines=["1", "2"])
    leases.run_log_append(run_id=run.id, fence=fence, lines=["3", "4"])
    run.refresh_from_db()
    assert run.log_lines() == ["2", "3", "4"]


def _steps(run, fence, elapsed: dict[int, float], started: float = 1000.0) -> float | None:
    """Report steps as the training loop does (train_loss and elapsed, each with its wall
    time), then read the run's ETA."""
    from webapp.experiments import selectors

    points = []
    for step, seconds in elapsed.items():
        points += [Point("train_loss", step, 1.0, started + seconds)]
        points += [Point("elapsed", step, seconds, started + seconds)]
    metrics.metrics_record(run_id=run.id, fence=fence, points=points)
    leases.run_heartbeat(run_id=run.id, fence=fence, step=max(elapsed))
    run.refresh_from_db()
    return selectors.run_eta_seconds(run=run)


def test_eta_follows_the_pace_of_training_steps(run):
    fence = leases.run_claim(run_id=run.id, worker="a")
    # The first step takes 4 s (warm-up), then 2 s each.
    eta = _steps(run, fence, {1: 4.0, 2: 6.0, 3: 8.0, 4: 10.0})
    assert eta == pytest.approx(12.0)  # 6 steps left × 2 s


def test_no_eta_before_three_steps_and_five_seconds(run):
    fence = leases.run_claim(run_id=run.id, worker="a")
    assert _steps(run, fence, {1: 1.0, 2: 3.5}) is None  # two steps
    assert _steps(run, fence, {3: 4.5}) is None  # three steps, but 4.5 s
    assert _steps(run, fence, {4: 5.5}) == pytest.approx(6 * 1.5)


def test_eta_reads_the_recent_pace_not_the_warm_up(cast):
    run = Run.objects.create(
        project=cast.acme_project,
        name="long",
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
        method="lora",
        total_steps=100,
    )
    fence = leases.run_claim(run_id=run.id, worker="a")
    slow = {step: 5.0 * step for step in range(1, 11)}  # 5 s a step while warming up: 50 s
    fast = {step: 50.0 + (step - 10) for step in range(11, 51)}  # then 1 s a step: 90 s
    assert _steps(run, fence, slow | fast) == pytest.approx(50 * 1.0)  # not 50 × 1.73


def test_a_resumed_runs_eta_ignores_the_earlier_attempt(run):
    Run.objects.filter(id=run.id).update(total_steps=100)
    fence = leases.run_claim(run_id=run.id, worker="a")
    _steps(run, fence, {step: 0.5 * step for step in range(1, 31)})  # 0.5 s a step
    Run.objects.filter(id=run.id).update(status=RunStatus.LOST)
    fence = leases.run_claim(run_id=run.id, worker="b")
    # Resumed from a checkpoint at step 20 on a slower worker: steps 21-30 are stored
    # already, so its first new points are from step 31, on a clock that started again.
    resumed = {step: 4.0 + 3.0 * (step - 31) for step in range(31, 41)}  # 3 s a step
    assert _steps(run, fence, resumed) == pytest.approx(60 * 3.0)


def test_eta_counts_the_steps_own_time_the_evaluations_ahead_and_the_measurement(run, cast):
    """Paced by train_s (the steps alone), not by elapsed, which holds an evaluation here."""
    Run.objects.filter(id=run.id).update(total_steps=10, train_config={"eval_every": 5})
    Run.objects.create(
        project=cast.acme_project, name="done", base_model=run.base_model,
        dataset=run.dataset, method="lora", status=RunStatus.SUCCEEDED,
        finished_at=timezone.now(), profile={"measure": "quick", "measure_s": 4.0},
    )  # fmt: skip
    fence = leases.run_claim(run_id=run.id, worker="a")
    points = []
    for step in (1, 2, 3, 4):
        points += [Point("train_s", step, 2.0 * step, 0.0), Point("elapsed", step, 9.0 * step, 0.0)]
    points += [Point(EVAL_SECONDS, 4, 3.0, 0.0)]
    metrics.metrics_record(run_id=run.id, fence=fence, points=points)
    leases.run_heartbeat(run_id=run.id, fence=fence, step=4)
    run.refresh_from_db()
    from webapp.experiments import selectors

    # 6 steps × 2 s, evaluations at step 5 and at the end × 3 s, the measurement 4 s
    assert selectors.run_eta_seconds(run=run) == pytest.approx(12 + 2 * 3 + 4)


def test_run_page_series_are_downsampled_and_keep_a_spike(run):
    from webapp.experiments import selectors

    fence = leases.run_claim(run_id=run.id, worker="a")
    points = [
        Point("train_loss", s, 1.0 + (50.0 if s == 3333 else 0.0), 0.0) for s in range(1, 5001)
    ]
    points += [Point("grad_norm", s, 0.5, 0.0) for s in range(1, 5001)]
    metrics.metrics_record(run_id=run.id, fence=fence, points=points)
    series = selectors.metric_series(run=run)
    assert set(series) == {"train_loss"}  # only what the run page draws
    loss = series["train_loss"]
    assert len(loss["step"]) <= 1000 and 51.0 in loss["value"]
    assert loss["step"][loss["value"].index(51.0)] == 3333


def test_metrics_record_leaves_out_non_finite_values(cast):
    from webapp.experiments.models import MetricPoint, Run

    run = Run.objects.create(
        project=cast.acme_project,
        name="r",
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
        method="lora",
    )
    fence = leases.run_claim(run_id=run.id, worker="w")
    points = [metrics.Point("eval_loss", s, v, 0.0) for s, v in [(1, 2.0), (2, float("nan"))]]
    assert metrics.metrics_record(run_id=run.id, fence=fence, points=points) == 1
    assert list(MetricPoint.objects.values_list("step", flat=True)) == [1]


@pytest.mark.django_db(transaction=True)
def test_a_batch_rolled_back_with_its_new_staging_table_does_not_break_the_next(run):
    """The staging table is created once per database session, but a transaction that rolls
    back takes a table it created along: the next batch must create it again, not fail."""
    from django.db import connection, transaction

    connection.close()  # a new session, whose first batch creates the staging table
    fence = leases.run_claim(run_id=run.id, worker="a")
    with pytest.raises(RuntimeError), transaction.atomic():
        metrics.metrics_record(run_id=run.id, fence=fence, points=[Point("x", 1, 1.0, 0.0)])
        raise RuntimeError("the batch's transaction fails after the staging")
    metrics.metrics_record(run_id=run.id, fence=fence, points=[Point("x", 2, 2.0, 0.0)])
    metrics.metrics_record(run_id=run.id, fence=fence, points=[Point("x", 3, 3.0, 0.0)])
    assert list(MetricPoint.objects.filter(run=run).values_list("step", flat=True)) == [2, 3]


def test_deleting_a_finished_run_deletes_its_points_and_rollups(run, cast):
    """No database constraint ties points to their run any more (it cost a fifth of every
    batch): the delete takes them, and on PostgreSQL the rollups, along."""
    from webapp.experiments.models import MetricRollup

    fence = leases.run_claim(run_id=run.id, worker="a")
    metrics.metrics_record(
        run_id=run.id, fence=fence, points=[Point("train_loss", s, 1.0, 0.0) for s in range(50)]
    )
    leases.run_finish(run_id=run.id, fence=fence, status=RunStatus.SUCCEEDED)
    other = Run.objects.create(
        project=run.project, name="o", base_model="tiny-llama", dataset=run.dataset, method="lora"
    )
    other_fence = leases.run_claim(run_id=other.id, worker="b")
    metrics.metrics_record(
        run_id=other.id, fence=other_fence, points=[Point("train_loss", 1, 2.0, 0.0)]
    )
    rollups_before = MetricRollup.objects.filter(run_id=other.id).count()
    services.run_delete(user=cast.alice, run=Run.objects.get(id=run.id))
    assert not MetricPoint.objects.filter(run_id=run.id).exists()
    assert not MetricRollup.objects.filter(run_id=run.id).exists()
    assert MetricPoint.objects.filter(run_id=other.id).count() == 1  # another run's stay
    assert MetricRollup.objects.filter(run_id=other.id).count() == rollups_before


def test_a_lost_run_is_not_deleted_under_the_reaper(run, cast):
    """A lost run is about to be sent again and claimed: deleting it is refused, as for a
    queued or running one, until it is cancelled."""
    from django.core.exceptions import ValidationError

    leases.run_claim(run_id=run.id, worker="a")
    Run.objects.filter(id=run.id).update(status=RunStatus.LOST)
    with pytest.raises(ValidationError, match="Cancel the run first"):
        services.run_delete(user=cast.alice, run=Run.objects.get(id=run.id))
    services.run_cancel_request(user=cast.alice, run=Run.objects.get(id=run.id))
    services.run_delete(user=cast.alice, run=Run.objects.get(id=run.id))
    assert not Run.objects.filter(id=run.id).exists()
