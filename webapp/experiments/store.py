"""The artifact store: model-sized files (checkpoints) behind Django's storage API.

`PEFTLAB_ARTIFACT_STORE` picks the backend (settings.STORAGES["artifacts"]); `file://` keeps
the files under VAR_DIR/artifacts. Whatever the backend, three rules hold:

- a file appears whole or not at all: its bytes go to a temporary name that is renamed into
  place once all are down and synced, so a crash leaves a `.partial-` file no key names,
  never a short file under a real key;
- a key is written once and never changed: writing a key that exists is refused;
- a read hashes while it streams and holds the last chunk back until size and sha256 match
  what was recorded at write time, so a damaged file is never delivered whole;
- a ranged read (HTTP Range) checks every BLOCK_BYTES block it touches against the block's
  sha256, also recorded at write time, before it yields a byte of that block.

Keys are made here from ids and a plain file name (`store_key`); no user string becomes a
path, and the file backend also refuses any key that would leave its root.
"""

import hashlib
import io
import os
import re
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from django.conf import settings
from django.core.files import File
from django.core.files.storage import FileSystemStorage, storages

READ_BYTES = 4 * 1024 * 1024
# A ranged read is verified block by block: it reads at most one block more than it sends.
# Stored block digests are of this size: it can never change.
BLOCK_BYTES = 16 * 1024 * 1024
PARTIAL_PREFIX = ".partial-"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class ArtifactDamaged(RuntimeError):
    """A stored file's bytes no longer match the sha256 recorded when it was written."""


class ArtifactMissing(ArtifactDamaged):
    """A stored file's bytes are gone from the store."""


@dataclass(frozen=True)
class Stored:
    key: str
    size: int
    sha256: str
    blocks: tuple[str, ...] = ()  # sha256 of each BLOCK_BYTES block, in order


class WriteOnceFileStorage(FileSystemStorage):
    """FileSystemStorage that writes through a temporary file and never replaces a file."""

    def get_available_name(self, name, max_length=None):
        if self.exists(name):
            raise FileExistsError(f"{name} is already stored; stored files are never changed")
        return name

    def _save(self, name, content):
        path = self.path(name)  # safe_join: SuspiciousFileOperation outside the root
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=directory, prefix=PARTIAL_PREFIX)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in content.chunks():
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.link(partial, path)  # atomic, and fails when the name exists
        finally:
            os.unlink(partial)
        return name


def artifact_storage():
    return storages["artifacts"]


def store_folder(*, run_id: int, kind: str) -> str:
    """Where a run's files of one kind live: runs/<id>/<kind>/."""
    if not _PLAIN_NAME.fullmatch(kind):
        raise ValueError(f"{kind!r} is not a plain kind")
    return f"runs/{int(run_id)}/{kind}/"


def plain_name(name: str, *, default: str = "file") -> str:
    """`name` where store_key takes it as it is, else `default`: a key's own file name, for a
    file whose shown name (Artifact.name) is any printable one."""
    return name if _PLAIN_NAME.fullmatch(name) else default


def store_key(*, run_id: int, kind: str, name: str) -> str:
    """A fresh key for one file of a run: runs/<id>/<kind>/<random>/<name>."""
    if not _PLAIN_NAME.fullmatch(name) or not _PLAIN_NAME.fullmatch(kind):
        raise ValueError(f"{name!r} of kind {kind!r} is not a plain file name")
    return store_folder(run_id=run_id, kind=kind) + f"{uuid.uuid4().hex}/{name}"


def store_write(key: str, source: bytes | BinaryIO) -> Stored:
    """Write `source` (bytes or a readable binary file) under `key`, hashing as it goes."""
    reader = _HashingReader(io.BytesIO(source) if isinstance(source, bytes) else source)
    saved = artifact_storage().save(key, File(reader, name=key))
    if saved != key:  # a backend that picked another name breaks the write-once rule
        artifact_storage().delete(saved)
        raise FileExistsError(f"{key} could not be stored under its own name")
    if settings.S3_PRESIGNED_URLS:  # downloads bypass the web's check: check it once here
        try:
            for _ in store_stream(key, size=reader.size, sha256=reader.digest.hexdigest()):
                pass
        except ArtifactDamaged:
            artifact_storage().delete(key)
            raise
    return Stored(
        key=key, size=reader.size, sha256=reader.digest.hexdigest(), blocks=reader.blocks()
    )


def store_check(key: str, *, size: int) -> None:
    """Raise before any byte is sent when the file is gone or has the wrong size."""
    storage = artifact_storage()
    if not storage.exists(key):
        raise ArtifactMissing(f"{key} is missing from the artifact store")
    if storage.size(key) != size:
        raise ArtifactDamaged(f"{key} is {storage.size(key)} bytes in the store, not {size}")


def store_stream(key: str, *, size: int, sha256: str) -> Iterator[bytes]:
    """The file's bytes in chunks; raises ArtifactDamaged instead of yielding the last chunk
    when the bytes read differ from `size` and `sha256`."""
    try:
        handle = artifact_storage().open(key, "rb")
    except FileNotFoundError:
        raise ArtifactMissing(f"{key} is missing from the artifact store") from None
    with handle:
        yield from _verified_chunks(handle.chunks(READ_BYTES), key, size=size, sha256=sha256)


def store_stream_range(
    key: str, *, start: int, stop: int, size: int, blocks: list[str]
) -> Iterator[bytes]:
    """Bytes [start, stop) of the file. Each block they fall in is read whole and checked
    against its recorded sha256 before any of it is yielded; ArtifactDamaged otherwise."""
    if not 0 <= start < stop <= size or len(blocks) != -(-size // BLOCK_BYTES):
        raise ValueError(f"bytes {start}-{stop} of a {size}-byte file with {len(blocks)} blocks")
    first = start // BLOCK_BYTES
    try:
        handle = open_from(artifact_storage(), key, first * BLOCK_BYTES)
    except FileNotFoundError:
        raise ArtifactMissing(f"{key} is missing from the artifact store") from None
    with handle:
        for index in range(first, -(-stop // BLOCK_BYTES)):
            offset = index * BLOCK_BYTES
            want = min(BLOCK_BYTES, size - offset)
            block = _read_exactly(handle, want)
            if len(block) != want or hashlib.sha256(block).hexdigest() != blocks[index]:
                raise ArtifactDamaged(f"{key}: block {index} fails its sha256 check")
            yield block[max(start - offset, 0) : stop - offset]


def open_from(storage, key: str, offset: int) -> BinaryIO:
    """The stored file opened for reading at `offset` (a ranged GET where the backend has one)."""
    if hasattr(storage, "open_from"):
        return storage.open_from(key, offset)
    handle = storage.open(key, "rb")
    handle.seek(offset)
    return handle


def _read_exactly(handle, want: int) -> bytes:
    parts, got = [], 0
    while got < want:
        part = handle.read(min(want - got, READ_BYTES))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def store_read(key: str, *, size: int, sha256: str) -> bytes:
    return b"".join(store_stream(key, size=size, sha256=sha256))


def store_delete(keys: Iterable[str]) -> None:
    storage = artifact_storage()
    for key in keys:
        storage.delete(key)  # a key already gone is no error


def store_walk(folder: str) -> Iterator[str]:
    """Every key under `folder` (a store_folder), partial uploads included."""
    storage = artifact_storage()
    try:
        folders, files = storage.listdir(folder)
    except FileNotFoundError:
        return
    for name in files:
        yield folder + name
    for name in folders:
        yield from store_walk(f"{folder}{name}/")


def store_delete_under(folder: str) -> None:
    """Delete every file under `folder`, also files no row names (a killed upload's)."""
    store_delete(list(store_walk(folder)))


def _verified_chunks(
    chunks: Iterable[bytes], key: str, *, size: int, sha256: str
) -> Iterator[bytes]:
    digest, seen, held = hashlib.sha256(), 0, None
    for chunk in chunks:
        digest.update(chunk)
        seen += len(chunk)
        if seen > size:
            raise ArtifactDamaged(f"{key} holds more than its {size} bytes")
        if held is not None:
            yield held
        held = chunk
    if seen != size or digest.hexdigest() != sha256:
        raise ArtifactDamaged(f"{key} fails its sha256 check")
    if held is not None:
        yield held


class _HashingReader(io.RawIOBase):
    """A read-only, unseekable view of `source` that hashes and counts what is read."""

    def __init__(self, source: BinaryIO) -> None:
        self.source, self.digest, self.size = source, hashlib.sha256(), 0
        self._blocks: list[str] = []
        self._block, self._in_block = hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.source.read(len(buffer))
        buffer[: len(data)] = data
        self.digest.update(data)
        self.size += len(data)
        view = memoryview(data)
        while view:
            take = min(len(view), BLOCK_BYTES - self._in_block)
            self._block.update(view[:take])
            self._in_block += take
            view = view[take:]
            if self._in_block == BLOCK_BYTES:
                self._blocks.append(self._block.hexdigest())
                self._block, self._in_block = hashlib.sha256(), 0
        return len(data)

    def blocks(self) -> tuple[str, ...]:
        """The block digests, the last (short) block included; () for an empty file."""
        tail = [self._block.hexdigest()] if self._in_block else []
        return (*self._blocks, *tail)
