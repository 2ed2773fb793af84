"""The claim and the fence: one worker owns a run; a stale worker's writes change nothing."""

import pytest

from webapp.experiments import services
from webapp.experiments.models import MetricPoint, Run, RunStatus
from webapp.experiments.services import Point, StaleFenceError

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
    assert services.run_claim(run_id=run.id, worker="a") == 1
    assert services.run_claim(run_id=run.id, worker="b") is None
    run.refresh_from_db()
    assert (run.status, run.worker, run.attempt, run.fence) == (RunStatus.RUNNING, "a", 1, 1)


def test_stale_fence_is_refused_everywhere(run):
    fence = services.run_claim(run_id=run.id, worker="a")
    Run.objects.filter(id=run.id).update(fence=fence + 1)  # another claim took it over
    stale = {"run_id": run.id, "fence": fence}
    with pytest.raises(StaleFenceError):
        services.run_heartbeat(**stale, step=3)
    with pytest.raises(StaleFenceError):
        services.metrics_record(**stale, points=[Point("train_loss", 1, 1.0, 0.0)])
    with pytest.raises(StaleFenceError):
        services.artifact_store(**stale, kind="adapter", name="x", data=b"x")
    with pytest.raises(StaleFenceError):
        services.run_finish(**stale, status=RunStatus.SUCCEEDED)
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING and run.step == 0
    assert not MetricPoint.objects.exists() and not run.artifacts.exists()


def test_metric_points_are_idempotent_per_step(run):
    fence = services.run_claim(run_id=run.id, worker="a")
    points = [Point("train_loss", step, 1.0 / step, 0.0) for step in (1, 2, 3)]
    services.metrics_record(run_id=run.id, fence=fence, points=points)
    services.metrics_record(run_id=run.id, fence=fence, points=points)
    assert MetricPoint.objects.filter(run=run).count() == 3


def test_heartbeat_reports_a_cancel(run, cast):
    fence = services.run_claim(run_id=run.id, worker="a")
    assert services.run_heartbeat(run_id=run.id, fence=fence, step=1) is False
    services.run_cancel_request(user=cast.bob, run=run)
    assert services.run_heartbeat(run_id=run.id, fence=fence, step=2) is True


def test_log_keeps_the_last_lines(run, settings):
    settings.RUN_LOG_LINES = 3
    fence = services.run_claim(run_id=run.id, worker="a")
    services.run_log_append(run_id=run.id, fence=fence, lines=["1", "2"])
    services.run_log_append(run_id=run.id, fence=fence, lines=["3", "4"])
    run.refresh_from_db()
    assert run.log_lines() == ["2", "3", "4"]


def test_eta_follows_the_pace_of_training_steps(run):
    from webapp.experiments import selectors

    fence = services.run_claim(run_id=run.id, worker="a")
    points = [Point("train_loss", step, 1.0, 100.0 + 2.0 * step) for step in (1, 2, 3, 4)]
    services.metrics_record(run_id=run.id, fence=fence, points=points)
    services.run_heartbeat(run_id=run.id, fence=fence, step=4)
    run.refresh_from_db()
    assert selectors.run_eta_seconds(run=run) == pytest.approx(12.0)  # 6 steps left × 2 s


def test_run_page_series_are_downsampled_and_keep_a_spike(run):
    from webapp.experiments import selectors

    fence = services.run_claim(run_id=run.id, worker="a")
    points = [
        Point("train_loss", s, 1.0 + (50.0 if s == 3333 else 0.0), 0.0) for s in range(1, 5001)
    ]
    points += [Point("grad_norm", s, 0.5, 0.0) for s in range(1, 5001)]
    services.metrics_record(run_id=run.id, fence=fence, points=points)
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
    fence = services.run_claim(run_id=run.id, worker="w")
    points = [services.Point("eval_loss", s, v, 0.0) for s, v in [(1, 2.0), (2, float("nan"))]]
    assert services.metrics_record(run_id=run.id, fence=fence, points=points) == 1
    assert list(MetricPoint.objects.values_list("step", flat=True)) == [1]
