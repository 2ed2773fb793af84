"""The artifact store (file://): whole files or none, write once, verified reads, no escape
from its root; checkpoints kept there, the last N per run, none once the run ends."""

import hashlib
import io

import pytest
from django.core.exceptions import SuspiciousFileOperation
from django.urls import reverse
from rest_framework.test import APIClient

from webapp.accounts.services import api_token_create
from webapp.api import views as api_views
from webapp.experiments import artifacts, leases, pages, store
from webapp.experiments.models import Artifact, ArtifactChunk, ArtifactHome, ArtifactKind, RunStatus


@pytest.fixture
def root(settings, tmp_path):
    location = tmp_path / "artifacts"
    backend = {"BACKEND": "webapp.experiments.store.WriteOnceFileStorage"}
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {**backend, "OPTIONS": {"location": str(location)}},
    }
    return location


def _files_under(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_written_file_reads_back_with_its_size_and_sha256(root):
    data = bytes(range(256)) * 1000
    stored = store.store_write("runs/1/checkpoint/x/a.bin", data)
    assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (root / "runs/1/checkpoint/x/a.bin").read_bytes() == data
    assert store.store_read(stored.key, size=stored.size, sha256=stored.sha256) == data


def test_a_stored_file_is_never_replaced(root):
    stored = store.store_write("k/a", b"first")
    with pytest.raises(FileExistsError):
        store.store_write("k/a", b"second")
    assert store.store_read("k/a", size=stored.size, sha256=stored.sha256) == b"first"
    assert _files_under(root) == ["k/a"]


class _DiesMidway(io.RawIOBase):
    """A source that gives some bytes, then fails as a crashed producer would."""

    def __init__(self) -> None:
        self.calls = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.calls += 1
        if self.calls > 2:
            raise ConnectionResetError("the producer died")
        buffer[:4] = b"part"
        return 4


def test_a_write_that_dies_midway_leaves_nothing_under_the_key(root):
    with pytest.raises(ConnectionResetError):
        store.store_write("k/big.safetensors", _DiesMidway())
    assert _files_under(root) == []
    stored = store.store_write("k/big.safetensors", b"whole")  # the key is still free
    assert stored.size == 5


def test_a_flipped_byte_cuts_the_stream_before_its_last_chunk(root, monkeypatch):
    monkeypatch.setattr(store, "READ_BYTES", 10)
    data = b"0123456789" * 5
    stored = store.store_write("k/f", data)
    damaged = bytearray(data)
    damaged[47] ^= 1
    (root / "k/f").chmod(0o644)
    (root / "k/f").write_bytes(bytes(damaged))
    received = []
    with pytest.raises(store.ArtifactDamaged, match="fails its sha256 check"):
        for chunk in store.store_stream("k/f", size=stored.size, sha256=stored.sha256):
            received.append(chunk)
    assert b"".join(received) == data[:40]  # the chunk holding the flip never left
    with pytest.raises(store.ArtifactDamaged):
        store.store_read("k/f", size=stored.size, sha256=stored.sha256)


def test_a_longer_or_missing_file_is_refused_before_any_byte(root):
    stored = store.store_write("k/f", b"abc")
    (root / "k/f").write_bytes(b"abcd")
    with pytest.raises(store.ArtifactDamaged, match="4 bytes in the store, not 3"):
        store.store_check("k/f", size=stored.size)
    (root / "k/f").unlink()
    with pytest.raises(store.ArtifactMissing):
        store.store_check("k/f", size=stored.size)
    with pytest.raises(store.ArtifactMissing):
        store.store_read("k/f", size=stored.size, sha256=stored.sha256)


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x\x00y", "é"])
def test_a_key_is_built_only_from_a_plain_file_name(name):
    with pytest.raises(ValueError, match="not a plain file name"):
        store.store_key(run_id=1, kind="checkpoint", name=name)


@pytest.mark.parametrize("key", ["../outside", "runs/../../outside", "/etc/passwd"])
def test_no_key_leaves_the_root(root, key):
    with pytest.raises(SuspiciousFileOperation):
        store.store_write(key, b"x")
    assert not (root.parent / "outside").exists()


def test_a_run_keeps_its_last_checkpoints_in_the_store_and_none_once_it_ends(
    root, settings, make_run, django_capture_on_commit_callbacks
):
    settings.CHECKPOINTS_KEPT = 2
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w1:1")
    for step in (1, 2, 3):
        files = {"checkpoint.json": f"{step}".encode(), "checkpoint.safetensors": b"t" * step}
        with django_capture_on_commit_callbacks(execute=True):
            leases.checkpoint_store(run_id=run.id, fence=fence, files=files)
    assert leases.checkpoint_versions(run_id=run.id) == [3, 2]
    assert leases.checkpoint_files(run_id=run.id)["checkpoint.json"] == b"3"
    assert leases.checkpoint_files(run_id=run.id, version=2)["checkpoint.safetensors"] == b"tt"
    rows = Artifact.objects.filter(run=run)
    assert set(rows.values_list("home", flat=True)) == {ArtifactHome.STORE}
    assert not ArtifactChunk.objects.filter(artifact__run=run).exists()  # no bytes in the DB
    assert _files_under(root) == sorted(rows.values_list("key", flat=True))
    assert len(_files_under(root)) == 4  # version 1's two files are gone
    with django_capture_on_commit_callbacks(execute=True):
        leases.run_finish(run_id=run.id, fence=fence, status=RunStatus.SUCCEEDED)
    assert leases.checkpoint_files(run_id=run.id) == {}
    assert _files_under(root) == []


def test_a_stale_workers_checkpoint_leaves_no_file_behind(root, make_run):
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w1:1")
    leases.run_finish(run_id=run.id, fence=fence, status=RunStatus.CANCELLED)
    with pytest.raises(leases.StaleFenceError):
        leases.checkpoint_store(run_id=run.id, fence=fence, files={"checkpoint.json": b"{}"})
    assert _files_under(root) == []
    assert not Artifact.objects.filter(run=run).exists()


def test_a_damaged_checkpoint_in_the_store_is_never_read_as_good(root, make_run):
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w1:1")
    leases.checkpoint_store(run_id=run.id, fence=fence, files={"checkpoint.json": b'{"a": 1}'})
    key = Artifact.objects.get(run=run).key
    (root / key).write_bytes(b'{"a": 2}')
    with pytest.raises(artifacts.ArtifactDamaged):
        leases.checkpoint_files(run_id=run.id)


def test_a_flipped_adapter_byte_is_never_downloaded_whole(cast, make_run, client, monkeypatch):
    """A database-home adapter through the API's file download (small: a 409 before the body;
    over the verify-first size: the stream is cut) and the page's zip."""
    run = make_run(status=RunStatus.SUCCEEDED)
    data = b"w" * 100
    adapter = artifacts.artifact_insert(
        run_id=run.id, kind=ArtifactKind.ADAPTER, name="adapter_model.safetensors", data=data
    )
    ArtifactChunk.objects.filter(artifact=adapter).update(data=b"W" + data[1:])
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {api_token_create(user=cast.bob, name='t')[1]}")
    url = reverse("api-artifact-download", args=[adapter.id])
    response = api.get(url)
    assert response.status_code == 409 and "is damaged" in response.json()["detail"]
    monkeypatch.setattr(api_views, "VERIFY_FIRST_BYTES", 10)  # as if the file were big
    response = api.get(url)
    assert response.status_code == 200  # headers go first; the body is cut
    with pytest.raises(artifacts.ArtifactDamaged):
        b"".join(response.streaming_content)
    client.force_login(cast.bob)
    url = reverse("run_adapter_download", args=[run.id])
    response = client.get(url)  # small: checked before the zip starts
    assert response.status_code == 409 and b"is damaged" in response.content
    monkeypatch.setattr(pages, "VERIFY_FIRST_BYTES", 10)  # as if it were big: the zip is cut
    response = client.get(url)
    with pytest.raises(artifacts.ArtifactDamaged):
        b"".join(response.streaming_content)


@pytest.mark.parametrize(
    ("url", "location"),
    [("file://", "artifacts"), ("file:///srv/peftlab/a", "/srv/peftlab/a")],
)
def test_the_store_setting_names_a_directory(url, location):
    from webapp import settings as module

    options = module.artifact_storage(url)["OPTIONS"]
    assert options["location"] == str(module.VAR_DIR / location)


def test_an_s3_store_setting_names_bucket_prefix_and_endpoint(monkeypatch):
    from webapp import settings as module

    monkeypatch.setenv("PEFTLAB_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.delenv("PEFTLAB_S3_ACCESS_KEY_ID", raising=False)
    options = module.artifact_storage("s3://runs-bucket/peftlab/prod/")["OPTIONS"]
    assert (options["bucket_name"], options["location"]) == ("runs-bucket", "peftlab/prod")
    assert (options["endpoint_url"], options["access_key"]) == ("http://minio:9000", None)
    assert options["file_overwrite"] is False


@pytest.mark.parametrize("url", ["s3://", "gs://b/p", "file://relative/dir", "/srv/x", ""])
def test_a_store_setting_it_cannot_serve_fails_loudly(url):
    from django.core.exceptions import ImproperlyConfigured

    from webapp import settings as module

    with pytest.raises(ImproperlyConfigured, match="PEFTLAB_ARTIFACT_STORE"):
        module.artifact_storage(url)


def test_a_checkpoint_uploaded_but_never_recorded_goes_when_the_run_ends(
    root, make_run, django_capture_on_commit_callbacks
):
    """A worker killed between uploading a checkpoint and recording it leaves files no row
    names; the run's end sweeps its whole checkpoint folder."""
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w1:1")
    artifacts.checkpoint_upload(run_id=run.id, files={"checkpoint.json": b"{}"})  # then killed
    other = make_run(name="other")
    artifacts.checkpoint_upload(run_id=other.id, files={"checkpoint.json": b"{}"})
    assert len(_files_under(root)) == 2
    with django_capture_on_commit_callbacks(execute=True):
        leases.run_finish(run_id=run.id, fence=fence, status=RunStatus.SUCCEEDED)
    assert [path.split("/")[1] for path in _files_under(root)] == [str(other.id)]
