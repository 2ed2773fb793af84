"""Uploaded datasets' block digests and checks: a preview reads and checks only the blocks
its rows lie in; a full read (a run, a download, the scheduled check) records damage, which
the dataset page then shows; migration 0015 gives existing files their digests."""

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.urls import reverse

from tests.webapp.test_dataset_files import _upload
from webapp.experiments import dataset_files, integrity, store
from webapp.experiments.models import Dataset

BLOCK = 1000
ROWS = b"text,label\n" + b"".join(
    f"review number {i} of the film,{'positive' if i % 2 else 'negative'}\n".encode()
    for i in range(200)
)


@pytest.fixture
def root(settings, tmp_path, monkeypatch):
    monkeypatch.setattr(store, "BLOCK_BYTES", BLOCK)
    location = tmp_path / "artifacts"
    backend = {"BACKEND": "webapp.experiments.store.WriteOnceFileStorage"}
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {**backend, "OPTIONS": {"location": str(location)}},
    }
    return location


def _damage_the_last_block(root, dataset: Dataset) -> None:
    path = root / dataset.file_key
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.django_db
def test_a_preview_checks_its_blocks_and_a_full_read_finds_the_rest(root, cast, client):
    dataset = _upload(cast, data=ROWS)
    assert dataset.file_size > 5 * BLOCK and len(dataset.file_blocks) == -(
        -dataset.file_size // BLOCK
    )
    _damage_the_last_block(root, dataset)
    client.force_login(cast.bob)
    page = client.get(reverse("dataset_detail", args=[dataset.id])).content.decode()
    assert "review number 3 of the film" in page  # the first blocks passed their check
    assert "damaged" not in page

    download = client.get(reverse("dataset_download", args=[dataset.id]))
    assert download.status_code == 409  # the whole file is read: the last block fails
    dataset.refresh_from_db()
    assert "sha256" in dataset.damaged and dataset.checked_at is not None
    page = client.get(reverse("dataset_detail", args=[dataset.id])).content.decode()
    assert "The dataset file is damaged" in page and "review number 3" not in page


@pytest.mark.django_db
def test_damage_in_a_previewed_block_is_refused(root, cast):
    dataset = _upload(cast, data=ROWS)
    path = root / dataset.file_key
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01  # block 0
    path.write_bytes(bytes(data))
    with pytest.raises(dataset_files.DatasetDamaged, match="block 0"):
        dataset_files.dataset_rows(dataset, limit=5)


@pytest.mark.django_db
def test_the_scheduled_check_covers_datasets_and_their_orphans(root, cast, make_run):
    dataset = _upload(cast, data=ROWS)
    call_command("verify_artifacts")
    dataset.refresh_from_db()
    assert dataset.checked_at is not None and dataset.damaged == ""
    _damage_the_last_block(root, dataset)
    Dataset.objects.filter(id=dataset.id).update(checked_at=None)
    with pytest.raises(CommandError):
        call_command("verify_artifacts")
    dataset.refresh_from_db()
    assert "sha256" in dataset.damaged

    import os
    import time

    orphan = root / f"datasets/{cast.acme.id}/abc/rows.jsonl"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"{}\n")
    old = time.time() - 2 * 86400
    os.utime(orphan, (old, old))
    os.utime(root / dataset.file_key, (old, old))
    assert integrity.sweep_runs_folder() == [f"datasets/{cast.acme.id}/abc/rows.jsonl"]
    assert (root / dataset.file_key).exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("leaves_every_app_migrated")
def test_0015_gives_existing_files_their_block_digests(root, cast):
    dataset = _upload(cast, data=ROWS)
    blocks = list(dataset.file_blocks)
    executor = MigrationExecutor(connection)
    executor.migrate([("experiments", "0014_checkpoints_to_store")])
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
    again = Dataset.objects.get(id=dataset.id)
    assert again.file_blocks == blocks and again.checked_at is not None
