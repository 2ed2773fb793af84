"""A resumed run reads its checkpoint from the artifact store, verified: a damaged newest
checkpoint is passed over for the one before it, never loaded."""

import pytest
import torch

from peft_core.checkpoint import capture_checkpoint, checkpoint_to_files
from webapp.experiments import leases
from webapp.experiments.models import Artifact
from workers import training


@pytest.fixture
def root(settings, tmp_path):
    location = tmp_path / "artifacts"
    backend = {"BACKEND": "webapp.experiments.store.WriteOnceFileStorage"}
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {**backend, "OPTIONS": {"location": str(location)}},
    }
    return location


def _checkpoint_at(step: int):
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    for _ in range(step):
        layer(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    return capture_checkpoint(
        step,
        named_params=dict(layer.named_parameters()),
        optimizer=optimizer,
        scheduler=scheduler,
        config_digest="0" * 64,
        tokens=step,
        metrics={"loss": 1.0},
    )


def _store(run_id: int, fence: int, step: int) -> None:
    files = checkpoint_to_files(_checkpoint_at(step))
    leases.checkpoint_store(run_id=run_id, fence=fence, files=files)


def test_resume_takes_the_newest_checkpoint_that_passes_its_sha256(root, settings, make_run):
    settings.CHECKPOINTS_KEPT = 2
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w1:1")
    for step in (3, 6):
        _store(run.id, fence, step)
    callbacks = training.RunCallbacks(run.id, fence)
    assert training._resume_point(run.id, callbacks).step == 6

    newest = Artifact.objects.get(run=run, version=2, name="checkpoint.safetensors")
    data = bytearray((root / newest.key).read_bytes())
    data[-1] ^= 1
    (root / newest.key).write_bytes(bytes(data))
    assert training._resume_point(run.id, callbacks).step == 3
    assert any("stored checkpoint 2 is unusable" in line for line in callbacks.lines)


def test_resume_starts_over_when_every_checkpoint_is_gone(root, make_run):
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w1:1")
    _store(run.id, fence, 2)
    for artifact in Artifact.objects.filter(run=run):
        (root / artifact.key).unlink()
    callbacks = training.RunCallbacks(run.id, fence)
    assert training._resume_point(run.id, callbacks) is None
    assert any("missing from the artifact store" in line for line in callbacks.lines)


def test_a_store_that_refuses_a_checkpoint_is_logged_and_training_goes_on(
    settings, tmp_path, make_run
):
    full = tmp_path / "full"
    full.write_text("a file where the store's root should be: every write fails")
    backend = {"BACKEND": "webapp.experiments.store.WriteOnceFileStorage"}
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {**backend, "OPTIONS": {"location": str(full)}},
    }
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w1:1")
    callbacks = training.RunCallbacks(run.id, fence)
    callbacks.on_checkpoint(_checkpoint_at(2))
    assert callbacks.checkpoints_stored == 0
    assert any("checkpoint at step 2 skipped: not stored" in line for line in callbacks.lines)
    assert not Artifact.objects.filter(run=run).exists()


def _files_under(root) -> list:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_a_run_given_up_by_the_reaper_or_cancelled_while_lost_keeps_no_checkpoint(
    root, cast, make_run, django_capture_on_commit_callbacks
):
    from datetime import timedelta

    from django.utils import timezone

    from webapp.experiments import services
    from webapp.experiments.models import Run, RunStatus

    given_up, cancelled = make_run(), make_run()
    for run in (given_up, cancelled):
        _store(run.id, leases.run_claim(run_id=run.id, worker="w1:1"), 2)
    assert len(_files_under(root)) == 4
    Run.objects.filter(id=given_up.id).update(attempt=3)
    old = timezone.now() - timedelta(minutes=5)
    Run.objects.filter(id__in=[given_up.id, cancelled.id]).update(heartbeat_at=old)
    with django_capture_on_commit_callbacks(execute=True):
        reaped = leases.runs_reap(lease_s=30, max_attempts=3)
    assert (reaped.failed, reaped.lost) == ([given_up.id], [cancelled.id])
    assert not Artifact.objects.filter(run=given_up).exists()
    assert len(_files_under(root)) == 2  # the lost run's, kept for its resume

    with django_capture_on_commit_callbacks(execute=True):
        run = services.run_cancel_request(user=cast.alice, run=cancelled)
    assert run.status == RunStatus.CANCELLED
    assert not Artifact.objects.filter(run=cancelled).exists()
    assert _files_under(root) == []
