"""The artifact store on a real S3-compatible server (CI starts one: .ci/run sets
PEFTLAB_TEST_S3_ENDPOINT_URL), with the rules the file store keeps."""

import io
import os
import uuid

import pytest
from django.core.exceptions import SuspiciousOperation

from webapp.experiments import leases, store
from webapp.experiments.models import Artifact, ArtifactChunk, ArtifactHome, RunStatus

ENDPOINT = os.environ.get("PEFTLAB_TEST_S3_ENDPOINT_URL", "")
BUCKET = os.environ.get("PEFTLAB_TEST_S3_BUCKET", "peftlab")


@pytest.fixture
def s3(settings, monkeypatch):
    """The store on the test server, under a fresh prefix; yields a boto3 client and it."""
    if not ENDPOINT:
        if settings.REQUIRE_SERVICES:
            pytest.fail("CI must test the S3 store: PEFTLAB_TEST_S3_ENDPOINT_URL is not set")
        pytest.skip("no S3-compatible server (PEFTLAB_TEST_S3_ENDPOINT_URL)")
    from webapp import settings as module

    for name, value in {
        "PEFTLAB_S3_ENDPOINT_URL": ENDPOINT,
        "PEFTLAB_S3_REGION": "us-east-1",
        "PEFTLAB_S3_ACCESS_KEY_ID": os.environ.get("PEFTLAB_TEST_S3_ACCESS_KEY_ID", "S3RVER"),
        "PEFTLAB_S3_SECRET_ACCESS_KEY": os.environ.get("PEFTLAB_TEST_S3_SECRET", "S3RVER"),
    }.items():
        monkeypatch.setenv(name, value)
    prefix = f"test-{uuid.uuid4().hex}"
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": module.artifact_storage(f"s3://{BUCKET}/{prefix}"),
    }
    client = store.artifact_storage().connection.meta.client
    return client, prefix


def _keys(s3) -> list[str]:
    client, prefix = s3
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    return sorted(item["Key"].removeprefix(prefix + "/") for item in listing.get("Contents", ()))


def test_a_big_file_goes_up_in_parts_and_reads_back_verified(s3):
    data = os.urandom(20 * 2**20 + 7)  # over boto3's 8 MiB multipart threshold
    stored = store.store_write("runs/1/checkpoint/x/checkpoint.safetensors", data)
    assert _keys(s3) == ["runs/1/checkpoint/x/checkpoint.safetensors"]  # no partial left
    assert store.store_read(stored.key, size=stored.size, sha256=stored.sha256) == data


def test_a_stored_object_is_never_replaced(s3):
    stored = store.store_write("k/a", b"first")
    with pytest.raises(FileExistsError):
        store.store_write("k/a", b"second")
    assert store.store_read("k/a", size=stored.size, sha256=stored.sha256) == b"first"


class _DiesMidway(io.RawIOBase):
    def __init__(self) -> None:
        self.calls = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.calls += 1
        if self.calls > 3:
            raise ConnectionResetError("the producer died")
        buffer[: len(buffer)] = b"p" * len(buffer)
        return len(buffer)


def test_an_upload_that_dies_midway_leaves_no_object_under_the_key(s3):
    with pytest.raises(ConnectionResetError):
        store.store_write("k/big.safetensors", _DiesMidway())
    assert "k/big.safetensors" not in _keys(s3)


def test_a_flipped_byte_or_a_missing_object_is_never_read_as_good(s3):
    client, prefix = s3
    stored = store.store_write("k/f", b"0123456789" * 10)
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/k/f", Body=b"0123456789" * 9 + b"012345678X")
    with pytest.raises(store.ArtifactDamaged, match="fails its sha256 check"):
        store.store_read("k/f", size=stored.size, sha256=stored.sha256)
    client.delete_object(Bucket=BUCKET, Key=f"{prefix}/k/f")
    with pytest.raises(store.ArtifactMissing):
        store.store_check("k/f", size=stored.size)
    with pytest.raises(store.ArtifactMissing):
        store.store_read("k/f", size=stored.size, sha256=stored.sha256)


def test_no_key_leaves_the_prefix(s3):
    with pytest.raises(SuspiciousOperation):
        store.store_write("../outside", b"x")


def test_checkpoints_live_in_the_bucket_and_go_with_the_run(
    s3, settings, make_run, django_capture_on_commit_callbacks
):
    settings.CHECKPOINTS_KEPT = 2
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w1:1")
    for step in (1, 2, 3):
        with django_capture_on_commit_callbacks(execute=True):
            leases.checkpoint_store(run_id=run.id, fence=fence, files={"c.json": b"%d" % step})
    assert leases.checkpoint_files(run_id=run.id) == {"c.json": b"3"}
    rows = Artifact.objects.filter(run=run)
    assert set(rows.values_list("home", flat=True)) == {ArtifactHome.STORE}
    assert not ArtifactChunk.objects.filter(artifact__run=run).exists()
    assert _keys(s3) == sorted(rows.values_list("key", flat=True))
    with django_capture_on_commit_callbacks(execute=True):
        leases.run_finish(run_id=run.id, fence=fence, status=RunStatus.SUCCEEDED)
    assert _keys(s3) == []


def test_a_range_is_one_ranged_get_verified_block_by_block(s3, monkeypatch):
    monkeypatch.setattr(store, "BLOCK_BYTES", 1000)
    data = os.urandom(4500)
    stored = store.store_write("k/model.safetensors", data)
    assert len(stored.blocks) == 5
    read = store.store_stream_range(
        "k/model.safetensors", start=2100, stop=3050, size=stored.size, blocks=list(stored.blocks)
    )
    assert b"".join(read) == data[2100:3050]
    client, prefix = s3
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/k/model.safetensors", Body=data[:4499] + b"!")
    good = store.store_stream_range(
        "k/model.safetensors", start=0, stop=10, size=stored.size, blocks=list(stored.blocks)
    )
    assert b"".join(good) == data[:10]  # block 0 still matches
    with pytest.raises(store.ArtifactDamaged, match="block 4"):
        b"".join(
            store.store_stream_range(
                "k/model.safetensors",
                start=4000,
                stop=4500,
                size=stored.size,
                blocks=list(stored.blocks),
            )
        )


def test_a_big_file_can_be_a_presigned_redirect_checked_when_written(
    s3, settings, make_run, cast, monkeypatch
):
    import urllib.request

    from django.urls import reverse
    from rest_framework.test import APIClient

    from webapp.accounts.services import api_token_create
    from webapp.api import views as api_views
    from webapp.experiments import artifacts

    settings.S3_PRESIGNED_URLS = True
    monkeypatch.setattr(api_views, "VERIFY_FIRST_BYTES", 10)  # as if the file were big
    run = make_run(status=RunStatus.SUCCEEDED)
    data = os.urandom(3000)
    key = store.store_key(run_id=run.id, kind="merged", name="model.safetensors")
    artifact = artifacts.artifact_record(
        run_id=run.id,
        kind="merged",
        name="model.safetensors",
        version=1,
        file=store.store_write(key, data),  # read back and checked once written
    )
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {api_token_create(user=cast.bob, name='t')[1]}")
    url = reverse("api-artifact-download", args=[artifact.id])
    answer = api.get(url)
    assert answer.status_code == 302
    location = answer["Location"]
    assert location.startswith(ENDPOINT) and "Expires=" in location  # short-lived, signed
    with urllib.request.urlopen(location, timeout=10) as response:  # noqa: S310 (the test server)
        assert response.read() == data
    artifacts.artifact_checked(artifact, damage="found by the verifier")
    assert api.get(url).status_code == 200  # a file known damaged is never redirected to
