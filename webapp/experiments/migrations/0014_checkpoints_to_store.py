"""Checkpoints still kept as chunk rows in PostgreSQL (written before 0012) move to the
artifact store, where every checkpoint now lives.

Forwards, for each database-home checkpoint file: its chunks stream into a new store file
(never the whole file in memory), the file is read back through the hashed stream and
checked against the sha256 recorded when the checkpoint was written, and only then does the
row name the file and lose its chunks. A file whose chunks already fail their sha256 stays
as it is (a resumed run skips a damaged checkpoint for an older one) and is reported.
Backwards, store checkpoints become chunk rows again, read through the same check, and their
store files are deleted once that has committed; one that is missing or fails its check is
dropped (no resume could use it) and reported. Keys follow store.store_key's layout,
frozen here.
"""

import hashlib
import io
import uuid

from django.db import migrations, transaction

from webapp.experiments.store import (
    ArtifactDamaged,
    store_delete,
    store_stream,
    store_write,
)

CHUNK_BYTES = 4 * 1024 * 1024


class _Chunks(io.RawIOBase):
    """The artifact's chunk rows as one readable stream, hashed as it is read."""

    def __init__(self, rows) -> None:
        self.rows, self.buffer, self.digest = iter(rows), b"", hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, out) -> int:
        while not self.buffer:
            data = next(self.rows, None)
            if data is None:
                return 0
            self.buffer = bytes(data)
            self.digest.update(self.buffer)
        size = min(len(out), len(self.buffer))
        out[:size], self.buffer = self.buffer[:size], self.buffer[size:]
        return size


def checkpoints_to_store(apps, schema_editor):
    Artifact = apps.get_model("experiments", "Artifact")
    ArtifactChunk = apps.get_model("experiments", "ArtifactChunk")
    rows = Artifact.objects.filter(kind="checkpoint", home="db").order_by("id")
    written: list[str] = []
    try:
        for artifact in rows.iterator(chunk_size=1):
            chunks = ArtifactChunk.objects.filter(artifact_id=artifact.id).order_by("index")
            source = _Chunks(chunks.values_list("data", flat=True).iterator(chunk_size=1))
            key = f"runs/{int(artifact.run_id)}/checkpoint/{uuid.uuid4().hex}/{artifact.name}"
            stored = store_write(key, source)
            written.append(key)
            if stored.sha256 != artifact.sha256 or stored.size != artifact.size:
                print(
                    f"\n  checkpoint {artifact.id} of run {artifact.run_id}: its rows fail "
                    "their sha256; left in the database"
                )
                store_delete([key])
                written.pop()
                continue
            for _ in store_stream(key, size=artifact.size, sha256=artifact.sha256):
                pass  # read back whole: ArtifactDamaged stops the migration
            Artifact.objects.filter(id=artifact.id).update(
                home="store", key=key, blocks=list(stored.blocks)
            )
            chunks.delete()
    except BaseException:
        store_delete(written)
        raise


def checkpoints_to_database(apps, schema_editor):
    Artifact = apps.get_model("experiments", "Artifact")
    ArtifactChunk = apps.get_model("experiments", "ArtifactChunk")
    rows = Artifact.objects.filter(kind="checkpoint", home="store").order_by("id")
    keys: list[str] = []
    for artifact in rows.iterator(chunk_size=1):
        try:
            stream = store_stream(artifact.key, size=artifact.size, sha256=artifact.sha256)
            for index, data in enumerate(_rechunked(stream)):
                ArtifactChunk.objects.create(artifact_id=artifact.id, index=index, data=data)
        except ArtifactDamaged as exc:  # unreadable anywhere: a resume could not use it
            print(f"\n  checkpoint {artifact.id} of run {artifact.run_id} dropped: {exc}")
            Artifact.objects.filter(id=artifact.id).delete()
            keys.append(artifact.key)
            continue
        Artifact.objects.filter(id=artifact.id).update(home="db", key="", blocks=[])
        keys.append(artifact.key)
    transaction.on_commit(lambda: store_delete(keys), robust=True)


def _rechunked(stream):
    """The stream in CHUNK_BYTES pieces (the last shorter); one empty chunk for no bytes."""
    buffer, sent = b"", False
    for data in stream:
        buffer += data
        while len(buffer) >= CHUNK_BYTES:
            yield buffer[:CHUNK_BYTES]
            buffer, sent = buffer[CHUNK_BYTES:], True
    if buffer or not sent:
        yield buffer


class Migration(migrations.Migration):
    dependencies = [
        ("experiments", "0013_dataset_file"),
    ]

    operations = [
        migrations.RunPython(checkpoints_to_store, checkpoints_to_database),
    ]
