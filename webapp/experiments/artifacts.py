"""A run's stored files, in their two homes, read back only when their sha256 still holds.

Adapters are chunk rows in the database (`artifact_insert`); checkpoints are write-once files
in the artifact store (webapp/experiments/store.py), described by the same Artifact rows.
Every reader of stored bytes goes through `artifact_files` / `artifact_file` (verified in
memory) or `artifact_stream` (hashed while streaming, last chunk held back): bytes that no
longer match the digest written with them are never handed on as if they were the file.
"""

import hashlib
from collections.abc import Iterator

from django.conf import settings
from django.db import transaction
from django.db.models import Max, QuerySet
from django.utils import timezone

from webapp.experiments.models import Artifact, ArtifactChunk, ArtifactHome, ArtifactKind
from webapp.experiments.store import (
    ArtifactDamaged,
    ArtifactMissing,
    Stored,
    store_check,
    store_delete,
    store_delete_under,
    store_folder,
    store_key,
    store_read,
    store_stream,
    store_stream_range,
    store_write,
)

__all__ = ["ArtifactDamaged", "ArtifactMissing"]

CHUNK_BYTES = 4 * 1024 * 1024
# Chunks per INSERT: a statement carries at most 32 MiB of bytes (64 MB as text). One
# statement for a whole merged model (540 MB) passes PostgreSQL's 1 GB message limit.
CHUNKS_PER_STATEMENT = 8


def artifact_insert(
    *, run_id: int, kind: str, name: str, data: bytes, version: int = 1
) -> Artifact:
    artifact = Artifact.objects.create(
        run_id=run_id,
        kind=kind,
        name=name,
        version=version,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    chunks = (
        ArtifactChunk(artifact=artifact, index=i, data=data[start : start + CHUNK_BYTES])
        for i, start in enumerate(range(0, max(len(data), 1), CHUNK_BYTES))
    )
    ArtifactChunk.objects.bulk_create(chunks, batch_size=CHUNKS_PER_STATEMENT)
    return artifact


def artifact_record(*, run_id: int, kind: str, name: str, version: int, file: Stored) -> Artifact:
    """A row for a file already written to the store (`store_write`'s answer)."""
    return Artifact.objects.create(
        run_id=run_id,
        kind=kind,
        name=name,
        version=version,
        size=file.size,
        sha256=file.sha256,
        blocks=list(file.blocks),
        home=ArtifactHome.STORE,
        key=file.key,
    )


def artifact_put(
    *, run_id: int, kind: str, name: str, data: bytes, version: int = 1, in_store: bool = False
) -> Artifact:
    """Store a small file in its home: an adapter as chunk rows (or in the store, where
    settings.ADAPTERS_IN_STORE says adapters are too big for the database, or `in_store`
    says the file is model-sized: a fully fine-tuned model's), anything else in the store.
    A row that cannot be written takes its store file with it."""
    in_database = not (settings.ADAPTERS_IN_STORE or in_store)
    if kind == ArtifactKind.ADAPTER and in_database:
        return artifact_insert(run_id=run_id, kind=kind, name=name, data=data, version=version)
    stored = store_write(store_key(run_id=run_id, kind=kind, name=name), data)
    try:
        return artifact_record(run_id=run_id, kind=kind, name=name, version=version, file=stored)
    except BaseException:
        store_delete([stored.key])
        raise


# ---------------------------------------------------------------- versions


def latest_version(*, run_id: int, kind: str) -> int | None:
    """The newest version of the run's files of one kind (None: it has none)."""
    versions = Artifact.objects.filter(run_id=run_id, kind=kind)
    return versions.aggregate(last=Max("version"))["last"]


def next_version(*, run_id: int, kind: str) -> int:
    return (latest_version(run_id=run_id, kind=kind) or 0) + 1


def version_files(artifacts: QuerySet[Artifact], *, version: int | None = None):
    """One version of a set of files (the newest when `version` is None)."""
    if version is None:
        version = artifacts.aggregate(last=Max("version"))["last"]
    return artifacts.filter(version=version)


# ---------------------------------------------------------------- verified reads


def artifact_files(*, run_id: int, kind: str, version: int | None = None) -> dict[str, bytes]:
    """The run's files of one kind (its newest version unless one is named) as
    {file name: bytes}, for a worker (no user check). Raises ArtifactDamaged when a file's
    bytes do not hash to its recorded sha256."""
    files = version_files(Artifact.objects.filter(run_id=run_id, kind=kind), version=version)
    return {a.name: _verified(a) for a in files}


def artifact_file(*, run_id: int, kind: str, name: str) -> bytes | None:
    """One stored file's newest bytes (None when the run has no such file); ArtifactDamaged
    as above."""
    files = Artifact.objects.filter(run_id=run_id, kind=kind, name=name)
    artifact = files.order_by("version").last()
    return None if artifact is None else _verified(artifact)


def artifact_check(artifact: Artifact) -> None:
    """Raise ArtifactDamaged before a download starts when a store file is gone or resized."""
    if artifact.home == ArtifactHome.STORE:
        try:
            store_check(artifact.key, size=artifact.size)
        except ArtifactDamaged as exc:
            artifact_checked(artifact, damage=str(exc))
            raise


def artifact_stream(artifact: Artifact) -> Iterator[bytes]:
    """The file's bytes in chunks, hashed as they go: on a mismatch the last chunk is never
    yielded and ArtifactDamaged cuts the stream (and the row records the damage)."""
    if artifact.home == ArtifactHome.STORE:
        chunks = store_stream(artifact.key, size=artifact.size, sha256=artifact.sha256)
    else:
        chunks = _verified_rows(artifact)
    return _recorded(artifact, chunks)


def artifact_range(artifact: Artifact, *, start: int, stop: int) -> Iterator[bytes] | None:
    """Bytes [start, stop) of a store file, each block checked before it is sent; None where
    the file has no block digests (a database-home file: send it whole instead)."""
    if artifact.home != ArtifactHome.STORE or not artifact.blocks:
        return None
    chunks = store_stream_range(
        artifact.key, start=start, stop=stop, size=artifact.size, blocks=artifact.blocks
    )
    return _recorded(artifact, chunks, whole=False)


def artifact_verify(artifact: Artifact) -> str:
    """Read the whole file and check it: "" when it is intact, else why not (recorded)."""
    try:
        artifact_check(artifact)
        for _ in artifact_stream(artifact):
            pass
    except ArtifactDamaged as exc:
        return str(exc)
    return ""


def artifact_checked(artifact: Artifact, *, damage: str = "") -> None:
    """Record the outcome of a full read of the file (or a failed partial one)."""
    artifact.checked_at, artifact.damaged = timezone.now(), damage[:2000]
    Artifact.objects.filter(id=artifact.id).update(
        checked_at=artifact.checked_at, damaged=artifact.damaged
    )


def _recorded(artifact: Artifact, chunks: Iterator[bytes], whole: bool = True) -> Iterator[bytes]:
    try:
        yield from chunks
    except ArtifactDamaged as exc:
        artifact_checked(artifact, damage=str(exc))
        raise
    if whole:
        artifact_checked(artifact)


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
    for name, file in stored.items():
        artifact_record(
            run_id=run_id, kind=ArtifactKind.CHECKPOINT, name=name, version=version, file=file
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
    """Drop the run's checkpoints: the rows now; once that commits, every file under the
    run's checkpoint folder, also one a killed worker uploaded but never recorded."""
    artifacts_delete(Artifact.objects.filter(run_id=run_id, kind=ArtifactKind.CHECKPOINT))
    folder = store_folder(run_id=run_id, kind=ArtifactKind.CHECKPOINT)
    transaction.on_commit(lambda: store_delete_under(folder), robust=True)


# ---------------------------------------------------------------- database rows


def _verified(artifact: Artifact) -> bytes:
    if artifact.home == ArtifactHome.STORE:
        try:
            return store_read(artifact.key, size=artifact.size, sha256=artifact.sha256)
        except ArtifactDamaged as exc:
            artifact_checked(artifact, damage=str(exc))
            raise
    chunks = artifact.chunks.order_by("index").values_list("data", flat=True)
    data = b"".join(bytes(chunk) for chunk in chunks)
    if hashlib.sha256(data).hexdigest() != artifact.sha256:
        damage = f"run {artifact.run_id}: stored {artifact.name} fails its sha256 check"
        artifact_checked(artifact, damage=damage)
        raise ArtifactDamaged(damage)
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
