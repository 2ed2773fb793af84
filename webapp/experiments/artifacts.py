"""A run's stored files, in their two homes, read back only when their sha256 still holds.

Adapters are chunk rows in the database (`artifact_insert`); checkpoints are write-once files
in the artifact store (webapp/experiments/store.py), described by the same Artifact rows.
Every reader of stored bytes goes through `artifact_files` / `artifact_file` (verified in
memory) or `artifact_stream` (hashed while streaming, last chunk held back): bytes that no
longer match the digest written with them are never handed on as if they were the file.
"""

import hashlib
from collections.abc import Iterator

from django.db import transaction
from django.db.models import Max, QuerySet

from webapp.experiments.models import Artifact, ArtifactChunk, ArtifactHome, ArtifactKind
from webapp.experiments.store import (
    ArtifactDamaged,
    ArtifactMissing,
    Stored,
    store_check,
    store_delete,
    store_key,
    store_read,
    store_stream,
    store_write,
)

__all__ = ["ArtifactDamaged", "ArtifactMissing"]

CHUNK_BYTES = 4 * 1024 * 1024
# Chunks per INSERT: a statement carries at most 32 MiB of bytes (64 MB as text). One
# statement for a whole merged model (540 MB) passes PostgreSQL's 1 GB message limit.
CHUNKS_PER_STATEMENT = 8


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
    artifact = Artifact.objects.filter(run_id=run_id, kind=kind, name=name).last()
    return None if artifact is None else _verified(artifact)


def artifact_check(artifact: Artifact) -> None:
    """Raise ArtifactDamaged before a download starts when a store file is gone or resized."""
    if artifact.home == ArtifactHome.STORE:
        store_check(artifact.key, size=artifact.size)


def artifact_stream(artifact: Artifact) -> Iterator[bytes]:
    """The file's bytes in chunks, hashed as they go: on a mismatch the last chunk is never
    yielded and ArtifactDamaged cuts the stream."""
    if artifact.home == ArtifactHome.STORE:
        return store_stream(artifact.key, size=artifact.size, sha256=artifact.sha256)
    return _verified_rows(artifact)


def artifacts_delete(artifacts: QuerySet[Artifact]) -> None:
    """Delete the rows now and their store files once the deletion is committed."""
    keys = list(artifacts.filter(home=ArtifactHome.STORE).values_list("key", flat=True))
    artifacts.delete()
    if keys:
        transaction.on_commit(lambda: store_delete(keys), robust=True)


# ---------------------------------------------------------------- checkpoints


def checkpoint_upload(*, run_id: int, files: dict[str, bytes]) -> dict[str, Stored]:
    """Put a checkpoint's files in the store (no row yet: `checkpoint_record` adds them)."""
    kind = ArtifactKind.CHECKPOINT
    stored: dict[str, Stored] = {}
    try:
        for name, data in sorted(files.items()):
            stored[name] = store_write(store_key(run_id=run_id, kind=kind, name=name), data)
    except BaseException:
        store_delete(s.key for s in stored.values())
        raise
    return stored


def checkpoint_record(*, run_id: int, stored: dict[str, Stored], keep: int) -> int:
    """Record uploaded files as the run's newest checkpoint and drop all but the last `keep`.
    Call inside the transaction that holds the run; returns the new version."""
    checkpoints = Artifact.objects.filter(run_id=run_id, kind=ArtifactKind.CHECKPOINT)
    version = (checkpoints.aggregate(last=Max("version"))["last"] or 0) + 1
    Artifact.objects.bulk_create(
        Artifact(
            run_id=run_id,
            kind=ArtifactKind.CHECKPOINT,
            name=name,
            version=version,
            size=file.size,
            sha256=file.sha256,
            home=ArtifactHome.STORE,
            key=file.key,
        )
        for name, file in stored.items()
    )
    artifacts_delete(checkpoints.filter(version__lte=version - keep))
    return version


def checkpoint_versions(*, run_id: int) -> list[int]:
    """The run's stored checkpoints, newest first."""
    versions = Artifact.objects.filter(run_id=run_id, kind=ArtifactKind.CHECKPOINT)
    return sorted(set(versions.values_list("version", flat=True)), reverse=True)


def checkpoint_files(*, run_id: int, version: int) -> dict[str, bytes]:
    """One checkpoint's files, each checked against its sha256 (ArtifactDamaged)."""
    files = Artifact.objects.filter(run_id=run_id, kind=ArtifactKind.CHECKPOINT, version=version)
    return {a.name: _verified(a) for a in files}


def checkpoints_delete(*, run_id: int) -> None:
    artifacts_delete(Artifact.objects.filter(run_id=run_id, kind=ArtifactKind.CHECKPOINT))


# ---------------------------------------------------------------- database rows


def _verified(artifact: Artifact) -> bytes:
    if artifact.home == ArtifactHome.STORE:
        return store_read(artifact.key, size=artifact.size, sha256=artifact.sha256)
    chunks = artifact.chunks.order_by("index").values_list("data", flat=True)
    data = b"".join(bytes(chunk) for chunk in chunks)
    if hashlib.sha256(data).hexdigest() != artifact.sha256:
        raise ArtifactDamaged(
            f"run {artifact.run_id}: stored {artifact.name} fails its sha256 check"
        )
    return data


def _verified_rows(artifact: Artifact) -> Iterator[bytes]:
    rows = ArtifactChunk.objects.filter(artifact=artifact).order_by("index")
    digest, held = hashlib.sha256(), None
    for data in rows.values_list("data", flat=True).iterator(chunk_size=1):
        digest.update(data)
        if held is not None:
            yield held
        held = bytes(data)
    if digest.hexdigest() != artifact.sha256:
        raise ArtifactDamaged(
            f"run {artifact.run_id}: stored {artifact.name} fails its sha256 check"
        )
    if held is not None:
        yield held
