"""Migration 0013_dataset_file forth and back on the test database (PostgreSQL in CI): each
upload's rows move between Dataset.content and a checked file in the artifact store."""

import hashlib

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from webapp.experiments import dataset_files, services
from webapp.experiments.models import Dataset
from webapp.experiments.store import ArtifactDamaged

BEFORE = ("experiments", "0013_artifact_checks")
AFTER = ("experiments", "0013_dataset_file")
CONTENT = b'{"prompt": "a", "completion": "b"}\n{"prompt": "c\\u2028", "completion": "d"}'


@pytest.fixture
def root(settings, tmp_path):
    location = tmp_path / "artifacts"
    backend = {"BACKEND": "webapp.experiments.store.WriteOnceFileStorage"}
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {**backend, "OPTIONS": {"location": str(location)}},
    }
    return location


def _files_under(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _migrate(target=None) -> MigrationExecutor:
    """Migrate to `target`, or to the latest migrations when None."""
    executor = MigrationExecutor(connection)
    executor.migrate([target] if target else executor.loader.graph.leaf_nodes())
    return MigrationExecutor(connection)


def _old_dataset_model(executor: MigrationExecutor):
    return executor.loader.project_state([BEFORE]).apps.get_model("experiments", "Dataset")


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("leaves_every_app_migrated")
def test_0013_moves_rows_into_checked_files_and_back(cast, root):
    old = _old_dataset_model(_migrate(BEFORE))
    upload = old.objects.create(
        team_id=cast.acme.id, name="pairs", task="causal-lm", content=CONTENT, row_count=2
    )
    empty = old.objects.create(team_id=cast.acme.id, name="no rows", task="causal-lm")

    _migrate()
    dataset = Dataset.objects.get(id=upload.id)
    written = CONTENT + b"\n"
    assert dataset.file_key.startswith(f"datasets/{cast.acme.id}/")
    assert (dataset.file_size, dataset.file_sha256) == (
        len(written),
        hashlib.sha256(written).hexdigest(),
    )
    assert (root / dataset.file_key).read_bytes() == written
    assert _files_under(root) == [dataset.file_key]  # none for the empty or built-in rows
    assert Dataset.objects.get(id=empty.id).file_key == ""
    assert dataset_files.dataset_rows(dataset) == [
        {"prompt": "a", "completion": "b"},
        {"prompt": "c\u2028", "completion": "d"},
    ]
    columns = {
        column.name
        for column in connection.introspection.get_table_description(
            connection.cursor(), Dataset._meta.db_table
        )
    }
    assert "content" not in columns  # the bytes are out of PostgreSQL

    old = _old_dataset_model(_migrate(BEFORE))
    assert bytes(old.objects.get(id=upload.id).content) == CONTENT
    assert bytes(old.objects.get(id=empty.id).content) == b""
    assert _files_under(root) == []  # deleted once the way back committed
    _migrate()
    assert dataset_files.dataset_rows(Dataset.objects.get(id=upload.id))[0]["prompt"] == "a"


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("leaves_every_app_migrated")
def test_0013_back_stops_on_a_damaged_file_and_loses_nothing(cast, root):
    dataset = _upload(cast)
    path = root / dataset.file_key
    path.write_bytes(path.read_bytes().replace(b"good", b"evil"))
    with pytest.raises(ArtifactDamaged):
        _migrate(BEFORE)
    assert AFTER in MigrationExecutor(connection).loader.applied_migrations
    _migrate()  # the later migrations, undone on the way back, forth again
    assert Dataset.objects.get(id=dataset.id).file_key == dataset.file_key
    assert _files_under(root) == [dataset.file_key]


def _upload(cast) -> Dataset:
    return services.dataset_upload_create(
        user=cast.alice,
        team=cast.acme,
        name="reviews",
        filename="r.csv",
        data=b"text,label\ngood,yes\nbad,no\n",
        task="seq-cls",
    )
