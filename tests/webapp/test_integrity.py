"""The scheduled check: stored files nobody downloads are re-read and damage is recorded;
files no row names (crashed uploads) are deleted once a day old."""

import os
import time
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from webapp.experiments import artifacts, integrity, store
from webapp.experiments.models import Artifact, ArtifactKind, RunStatus


@pytest.fixture
def root(settings, tmp_path):
    location = tmp_path / "artifacts"
    backend = {"BACKEND": "webapp.experiments.store.WriteOnceFileStorage"}
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {**backend, "OPTIONS": {"location": str(location)}},
    }
    return location


def _two_files(run):
    adapter = artifacts.artifact_insert(
        run_id=run.id, kind=ArtifactKind.ADAPTER, name="adapter_model.safetensors", data=b"a" * 10
    )
    stored = store.store_write(store.store_key(run_id=run.id, kind="merged", name="m"), b"m" * 20)
    merged = artifacts.artifact_record(
        run_id=run.id, kind=ArtifactKind.MERGED, name="m", version=1, file=stored
    )
    return adapter, merged


def test_a_pass_checks_what_is_due_and_records_damage(root, make_run, settings):
    settings.ARTIFACT_RECHECK_DAYS = 7
    run = make_run(status=RunStatus.SUCCEEDED)
    adapter, merged = _two_files(run)
    (root / merged.key).write_bytes(b"M" * 20)
    checked = integrity.verify_due(max_bytes=2**30)
    assert (checked.files, checked.bytes) == (2, 30)
    assert len(checked.damaged) == 1 and f"run {run.id} merged m v1" in checked.damaged[0]
    merged.refresh_from_db()
    adapter.refresh_from_db()
    assert "sha256" in merged.damaged and adapter.damaged == ""
    assert adapter.checked_at is not None

    assert integrity.verify_due(max_bytes=2**30).files == 0  # nothing due again yet
    later = timezone.now() + timedelta(days=8)
    assert integrity.verify_due(max_bytes=2**30, now=later).files == 2


def test_a_pass_stops_at_its_byte_budget_never_before_one_file(root, make_run):
    run = make_run(status=RunStatus.SUCCEEDED)
    _two_files(run)
    assert integrity.verify_due(max_bytes=1).files == 1  # the oldest-checked file, whole
    assert integrity.verify_due(max_bytes=1).files == 1  # then the next one
    assert integrity.verify_due(max_bytes=1).files == 0


def test_the_command_exits_2_on_damage_and_a_run_page_shows_it(root, make_run, client, cast):
    run = make_run(status=RunStatus.SUCCEEDED)
    _, merged = _two_files(run)
    call_command("verify_artifacts")  # all intact: exits 0
    client.force_login(cast.bob)
    assert "Damaged" not in client.get(f"/runs/{run.id}/").content.decode()
    (root / merged.key).write_bytes(b"M" * 20)  # nobody downloads it; the check finds it
    Artifact.objects.filter(id=merged.id).update(checked_at=None)
    with pytest.raises(CommandError) as failed:
        call_command("verify_artifacts")
    assert failed.value.returncode == 2
    page = client.get(f"/runs/{run.id}/").content.decode()
    assert "Damaged file:" in page and "Merged model m" in page


def test_files_no_row_names_go_once_a_day_old(root, make_run):
    run = make_run(status=RunStatus.SUCCEEDED)
    _, merged = _two_files(run)
    folder = root / f"runs/{run.id}/checkpoint/x"
    folder.mkdir(parents=True)
    old_orphan, young_orphan = folder / "checkpoint.json", folder / "checkpoint.safetensors"
    partial = root / f"runs/{run.id}/merged/{store.PARTIAL_PREFIX}abc"
    for path in (old_orphan, young_orphan, partial):
        path.write_bytes(b"x")
    two_days_ago = time.time() - 2 * 86400
    for path in (old_orphan, partial, root / merged.key):
        os.utime(path, (two_days_ago, two_days_ago))
    swept = integrity.sweep_runs_folder()
    assert sorted(swept) == sorted(
        [f"runs/{run.id}/checkpoint/x/checkpoint.json", f"runs/{run.id}/merged/.partial-abc"]
    )
    assert young_orphan.exists() and (root / merged.key).exists()  # named, however old
