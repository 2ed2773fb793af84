"""Migration 0012 (Artifact home / key / version) forth and back on the test database."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from webapp.experiments import artifacts
from webapp.experiments.models import Artifact, ArtifactHome, ArtifactKind

BEFORE = ("experiments", "0011_run_base_weights")


def _migrate(targets) -> MigrationExecutor:
    executor = MigrationExecutor(connection)
    executor.migrate(targets)
    return MigrationExecutor(connection)


@pytest.mark.django_db(transaction=True)
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

    _migrate(executor.loader.graph.leaf_nodes("experiments"))
    again = Artifact.objects.get()
    assert (again.id, again.version, again.home, again.key) == (adapter.id, 1, "db", "")
    assert artifacts.artifact_file(run_id=run.id, kind=ArtifactKind.ADAPTER, name="a") == b"1"
