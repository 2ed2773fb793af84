"""The artifact store on S3 or any S3-compatible server (MinIO), through django-storages.

Imported only when PEFTLAB_ARTIFACT_STORE is s3://bucket/prefix, so boto3 is needed only
there. The rules of webapp/experiments/store.py hold: the bytes go up (in multipart parts
when big) under a `.partial-` key, are copied to the real key once all are up and the
partial object is deleted; a key that exists is never written; reads stream the object's
body instead of downloading it whole first.
"""

import posixpath
import uuid

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError
from django.core.files import File
from storages.backends.s3 import S3Storage
from storages.utils import clean_name

from webapp.experiments.store import PARTIAL_PREFIX

# CopyObject takes objects up to 5 GiB; bigger ones are copied in parts (UploadPartCopy).
_COPY = TransferConfig(multipart_threshold=5 * 2**30, multipart_chunksize=512 * 2**20)


class WriteOnceS3Storage(S3Storage):
    def get_available_name(self, name, max_length=None):
        name = clean_name(name)
        if self.exists(name):
            raise FileExistsError(f"{name} is already stored; stored files are never changed")
        return name

    def _save(self, name, content):
        name = clean_name(name)
        partial = posixpath.join(posixpath.dirname(name), PARTIAL_PREFIX + uuid.uuid4().hex)
        source = self._normalize_name(super()._save(partial, content))
        client = self.connection.meta.client
        try:
            client.copy(
                {"Bucket": self.bucket_name, "Key": source},
                self.bucket_name,
                self._normalize_name(name),
                Config=_COPY,
            )
        finally:
            client.delete_object(Bucket=self.bucket_name, Key=source)
        return name

    def _open(self, name, mode="rb"):
        if mode != "rb":
            raise ValueError("stored files are read only")
        return self._get(name)

    def open_from(self, name, offset: int) -> File:
        """The object's body from byte `offset` on: one ranged GET, nothing before it read."""
        return self._get(name, Range=f"bytes={int(offset)}-") if offset else self._get(name)

    def _get(self, name, **extra) -> File:
        key = self._normalize_name(clean_name(name))
        try:
            body = self.connection.meta.client.get_object(Bucket=self.bucket_name, Key=key, **extra)
        except ClientError as err:
            if err.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{name} does not exist") from None
            raise
        return File(body["Body"], name=name)
