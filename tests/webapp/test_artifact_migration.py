"""Migration 0012 (Artifact home / key / version) forth and back on the test database."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from webapp.experiments import artifacts, store
from webapp.experiments.models import Artifact, ArtifactHome, ArtifactKind

BEFORE = ("experiments", "0011_run_base_weights")


def _migrate(targets) -> MigrationExecutor:
    executor = MigrationExecutor(connection)
    executor.migrate(targets)
    return MigrationExecutor(connection)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("leaves_every_app_migrated")
def test_0012_back_keeps_database_files_and_drops_what_0011_cannot_hold(make_run):
    run = make_run()
    adapter = artifacts.artifact_insert(
        run_id=run.id, kind=ArtifactKind.ADAPTER, name="a", data=b"1"
    )
    for version in (1, 2):
        Artifact.objects.create(
            run=run,
            kind=ArtifactKind.CHECKPOINT,
            name="checkpoint.json",
            version=version,
            size=1,
            sha256="0" * 64,
            home=ArtifactHome.STORE,
            key=f"runs/{run.id}/checkpoint/{version}/checkpoint.json",
        )

    executor = _migrate([BEFORE])
    old = executor.loader.project_state([BEFORE]).apps.get_model("experiments", "Artifact")
    assert list(old.objects.values_list("id", "name")) == [(adapter.id, "a")]
    assert {f.name for f in old._meta.fields} >= {"sha256"}
    assert not {"home", "key", "version"} & {f.name for f in old._meta.fields}

    _migrate(executor.loader.graph.leaf_nodes())
    again = Artifact.objects.get()
    assert (again.id, again.version, again.home, again.key) == (adapter.id, 1, "db", "")
    assert artifacts.artifact_file(run_id=run.id, kind=ArtifactKind.ADAPTER, name="a") == b"1"


BEFORE_0014 = ("experiments", "0013_dataset_file")
AFTER_0014 = ("experiments", "0014_checkpoints_to_store")


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("leaves_every_app_migrated")
def test_0014_moves_database_checkpoints_to_the_store_and_back(make_run, settings, tmp_path):
    import hashlib

    from webapp.experiments.models import ArtifactChunk

    root = tmp_path / "artifacts"
    backend = {"BACKEND": "webapp.experiments.store.WriteOnceFileStorage"}
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {**backend, "OPTIONS": {"location": str(root)}},
    }
    run = make_run()
    executor = _migrate([BEFORE_0014])
    apps = executor.loader.project_state([BEFORE_0014]).apps
    OldArtifact = apps.get_model("experiments", "Artifact")
    OldChunk = apps.get_model("experiments", "ArtifactChunk")
    parts = [b"a" * 5000, b"b" * 3000]  # two chunk rows
    whole = b"".join(parts)
    good = OldArtifact.objects.create(
        run_id=run.id,
        kind="checkpoint",
        name="checkpoint.safetensors",
        version=1,
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
    )
    for index, data in enumerate(parts):
        OldChunk.objects.create(artifact_id=good.id, index=index, data=data)
    bad = OldArtifact.objects.create(
        run_id=run.id,
        kind="checkpoint",
        name="checkpoint.json",
        version=1,
        size=2,
        sha256=hashlib.sha256(b"{}").hexdigest(),
    )
    OldChunk.objects.create(artifact_id=bad.id, index=0, data=b"{]")  # damaged already

    _migrate([AFTER_0014])
    moved, kept = Artifact.objects.get(id=good.id), Artifact.objects.get(id=bad.id)
    assert moved.home == ArtifactHome.STORE and (root / moved.key).read_bytes() == whole
    assert len(moved.blocks) == 1 and not ArtifactChunk.objects.filter(artifact=moved).exists()
    assert kept.home == ArtifactHome.DATABASE and ArtifactChunk.objects.filter(artifact=kept)
    assert store.store_read(moved.key, size=moved.size, sha256=moved.sha256) == whole

    _migrate([BEFORE_0014])
    back = OldArtifact.objects.get(id=good.id)
    assert (back.home, back.key) == ("db", "")
    chunks = OldChunk.objects.filter(artifact_id=good.id).order_by("index")
    assert b"".join(bytes(c.data) for c in chunks) == whole
    assert not (root / moved.key).exists()
    _migrate(executor.loader.graph.leaf_nodes())
