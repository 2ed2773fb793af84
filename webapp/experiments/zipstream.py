"""Stream a zip of stored artifacts from either home, one chunk at a time, hashed as it goes."""

import io
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime

from webapp.experiments.artifacts import artifact_stream
from webapp.experiments.models import Artifact


class _Sink(io.RawIOBase):
    """An unseekable file that collects what zipfile writes until the generator drains it."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def drain(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def artifact_chunks(artifact: Artifact) -> Iterator[bytes]:
    """The file from either home, hashed while streaming: ArtifactDamaged cuts the transfer
    before its last chunk when the bytes do not match their sha256."""
    return artifact_stream(artifact)


def _member_info(artifact: Artifact) -> zipfile.ZipInfo:
    stored = artifact.name.endswith(".safetensors")
    return _file_info(artifact.name, artifact.created_at, stored=stored)


def stream_zip(
    artifacts: Iterable[Artifact], extra: Mapping[str, bytes] | None = None, when=None
) -> Iterator[bytes]:
    """The artifacts, then the small in-memory files of `extra` ({name: bytes}, dated `when`)
    whose names no artifact takes."""
    sink = _Sink()
    names = set()
    with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_DEFLATED) as archive:
        for artifact in artifacts:
            names.add(artifact.name)
            big = artifact.size >= 2**31
            with archive.open(_member_info(artifact), mode="w", force_zip64=big) as member:
                for chunk in artifact_chunks(artifact):
                    member.write(chunk)
                    yield sink.drain()
        for name, data in (extra or {}).items():
            if name not in names:
                archive.writestr(_file_info(name, when or datetime.now()), data)
                yield sink.drain()
    yield sink.drain()


def _file_info(name: str, when: datetime, stored: bool = False) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=when.timetuple()[:6])
    info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info
