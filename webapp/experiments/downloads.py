"""One stored file as an HTTP response, verified: GET, HEAD and single-range GET.

- A file up to VERIFY_FIRST_BYTES is read and checked whole before a byte is sent, so damage
  is an error status, never a 200 with bad bytes.
- A bigger one streams hashed; a mismatch raises before its last chunk, which cuts the
  transfer (the client sees a short body, never a complete one).
- `Range: bytes=a-b` on a store file sends 206 with those bytes, each 16 MiB block they
  touch checked against its own sha256 first (store.BLOCK_BYTES). A database-home file has no
  block digests: it answers 200 with the whole file, as HTTP allows.
- HEAD answers the headers (size, sha256 as the ETag) after checking that a store file is
  there with its size; it reads no bytes.
- With settings.S3_PRESIGNED_URLS a big store file is a redirect to a short-lived presigned
  URL; its bytes were read back when written and are re-read on a schedule.

ArtifactDamaged (and ArtifactMissing) escape to the caller before the response is built,
so the page and the API each answer in their own way.
"""

import re

from django.conf import settings
from django.http import HttpResponse, HttpResponseRedirect, StreamingHttpResponse
from django.utils.http import content_disposition_header

from webapp.experiments.artifacts import artifact_check, artifact_range, artifact_stream
from webapp.experiments.models import Artifact, ArtifactHome
from webapp.experiments.store import artifact_storage

VERIFY_FIRST_BYTES = 64 * 2**20
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class RangeNotSatisfiable(ValueError):
    """A Range header that names no byte of the file."""


def file_response(request, artifact: Artifact, *, verify_first_bytes: int | None = None):
    limit = VERIFY_FIRST_BYTES if verify_first_bytes is None else verify_first_bytes
    artifact_check(artifact)  # a store file gone or resized: before any header
    if request.method == "HEAD":
        return _headed(HttpResponse(b""), artifact, length=artifact.size)
    wanted = _wanted_range(request, artifact)
    if wanted is not None:
        start, stop = wanted
        chunks = artifact_range(artifact, start=start, stop=stop)
        if chunks is not None:
            if stop - start <= limit:  # checked whole: damage is an error, not a short body
                response = HttpResponse(b"".join(chunks), status=206)
            else:
                response = StreamingHttpResponse(chunks, status=206)
            response["Content-Range"] = f"bytes {start}-{stop - 1}/{artifact.size}"
            return _headed(response, artifact, length=stop - start)
    if artifact.size > limit and _presigned(artifact):
        return HttpResponseRedirect(_presigned_url(artifact))
    if artifact.size <= limit:
        response = HttpResponse(b"".join(artifact_stream(artifact)))
    else:
        response = StreamingHttpResponse(artifact_stream(artifact))
    return _headed(response, artifact, length=artifact.size)


def _headed(response, artifact: Artifact, *, length: int):
    response["Content-Type"] = "application/octet-stream"
    response["Content-Disposition"] = content_disposition_header(True, artifact.name)
    response["Content-Length"] = str(length)
    response["ETag"] = f'"{artifact.sha256}"'
    response["Accept-Ranges"] = "bytes" if _ranged(artifact) else "none"
    response["X-Content-Type-Options"] = "nosniff"
    return response


def _ranged(artifact: Artifact) -> bool:
    return artifact.home == ArtifactHome.STORE and bool(artifact.blocks)


def _wanted_range(request, artifact: Artifact) -> tuple[int, int] | None:
    """[start, stop) of a single satisfiable byte range; None to send the whole file."""
    header = request.headers.get("Range", "")
    if not header or not _ranged(artifact):
        return None
    if_range = request.headers.get("If-Range")
    if if_range and if_range != f'"{artifact.sha256}"':
        return None  # the client holds other bytes: it gets the whole file
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None  # several ranges or another unit: the whole file, as HTTP allows
    first, last, size = match.group(1), match.group(2), artifact.size
    if first:
        start = int(first)
        stop = min(int(last) + 1, size) if last else size
        if last and int(last) < start:
            return None  # invalid: ignored
    elif last:
        start, stop = max(size - int(last), 0), size
    else:
        return None
    if start >= size or stop <= start:
        raise RangeNotSatisfiable(f"bytes */{size}")
    return start, stop


def _presigned(artifact: Artifact) -> bool:
    storage = artifact_storage()
    return (
        settings.S3_PRESIGNED_URLS
        and artifact.home == ArtifactHome.STORE
        and not artifact.damaged
        and hasattr(storage, "open_from")  # the S3 backend
    )


def _presigned_url(artifact: Artifact) -> str:
    disposition = content_disposition_header(True, artifact.name)
    return artifact_storage().url(
        artifact.key,
        parameters={"ResponseContentDisposition": disposition},
        expire=settings.S3_PRESIGNED_TTL_S,
    )


def not_satisfiable(exc: RangeNotSatisfiable) -> HttpResponse:
    response = HttpResponse(status=416)
    response["Content-Range"] = str(exc)
    return response
