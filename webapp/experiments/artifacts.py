"""A run's stored files: written in chunk rows, read back only when their sha256 still holds.

Every reader of stored bytes goes through `artifact_files` (or the download streams, which
hash as they send): bytes that no longer match the digest written with them are never
handed on as if they were the file.
"""

import hashlib

from webapp.experiments.models import Artifact, ArtifactChunk

CHUNK_BYTES = 4 * 1024 * 1024
# Chunks per INSERT: a statement carries at most 32 MiB of bytes (64 MB as text). One
# statement for a whole merged model (540 MB) passes PostgreSQL's 1 GB message limit.
CHUNKS_PER_STATEMENT = 8


class ArtifactDamaged(RuntimeError):
    """A stored file's bytes no longer match the sha256 recorded when it was written."""


def artifact_insert(*, run_id: int, kind: str, name: str, data: bytes) -> Artifact:
    artifact = Artifact.objects.create(
        run_id=run_id, kind=kind, name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    chunks = (
        ArtifactChunk(artifact=artifact, index=i, data=data[start : start + CHUNK_BYTES])
        for i, start in enumerate(range(0, max(len(data), 1), CHUNK_BYTES))
    )
    ArtifactChunk.objects.bulk_create(chunks, batch_size=CHUNKS_PER_STATEMENT)
    return artifact


def artifact_files(*, run_id: int, kind: str) -> dict[str, bytes]:
    """The run's files of one kind as {file name: bytes}, for a worker (no user check).
    Raises ArtifactDamaged when a file's bytes do not hash to its recorded sha256."""
    return {a.name: _verified(a) for a in Artifact.objects.filter(run_id=run_id, kind=kind)}


def artifact_file(*, run_id: int, kind: str, name: str) -> bytes | None:
    """One stored file's bytes (None when the run has no such file); ArtifactDamaged as above."""
    artifact = Artifact.objects.filter(run_id=run_id, kind=kind, name=name).first()
    return None if artifact is None else _verified(artifact)


def _verified(artifact: Artifact) -> bytes:
    chunks = artifact.chunks.order_by("index").values_list("data", flat=True)
    data = b"".join(bytes(chunk) for chunk in chunks)
    if hashlib.sha256(data).hexdigest() != artifact.sha256:
        raise ArtifactDamaged(
            f"run {artifact.run_id}: stored {artifact.name} fails its sha256 check"
        )
    return data
