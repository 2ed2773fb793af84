"""Stored files: written in statements of bounded size, read back only when they still hash to
the sha256 written with them."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from webapp.experiments import artifacts
from webapp.experiments.models import ArtifactChunk, ArtifactKind

pytestmark = pytest.mark.django_db


def test_a_big_file_goes_in_statements_of_bounded_size(make_run, monkeypatch):
    """A 540 MB merged model in one INSERT passed PostgreSQL's 1 GB message limit (the
    server closed the connection); each statement now carries a bounded number of chunks."""
    monkeypatch.setattr(artifacts, "CHUNK_BYTES", 10)
    run = make_run()
    data = bytes(range(256)) * 2  # 512 bytes: 52 chunks
    with CaptureQueriesContext(connection) as queries:
        artifacts.artifact_insert(run_id=run.id, kind=ArtifactKind.MERGED, name="w", data=data)
    inserts = [q["sql"] for q in queries if "experiments_artifactchunk" in q["sql"]]
    assert len(inserts) == -(-52 // artifacts.CHUNKS_PER_STATEMENT)
    assert artifacts.artifact_files(run_id=run.id, kind=ArtifactKind.MERGED) == {"w": data}


def test_a_flipped_byte_is_never_handed_on(make_run):
    run = make_run()
    artifacts.artifact_insert(run_id=run.id, kind=ArtifactKind.ADAPTER, name="a", data=b"x" * 64)
    chunk = ArtifactChunk.objects.get(artifact__run=run)
    chunk.data = b"y" + bytes(chunk.data)[1:]
    chunk.save()
    with pytest.raises(artifacts.ArtifactDamaged, match="fails its sha256 check"):
        artifacts.artifact_files(run_id=run.id, kind=ArtifactKind.ADAPTER)
