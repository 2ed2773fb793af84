"""Stored bytes that no longer match their sha256 are never served as a success: the run
page says which file is damaged, the page's zip, the share link and the API refuse it.
Also: HEAD and verified byte ranges of store files, adapter versions, adapters in the store."""

import hashlib
import os

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from webapp.accounts.services import api_token_create
from webapp.experiments import artifacts, leases, services, store
from webapp.experiments.models import (
    Artifact,
    ArtifactChunk,
    ArtifactHome,
    ArtifactKind,
    RunStatus,
    ShareScope,
)


@pytest.fixture
def root(settings, tmp_path):
    location = tmp_path / "artifacts"
    backend = {"BACKEND": "webapp.experiments.store.WriteOnceFileStorage"}
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {**backend, "OPTIONS": {"location": str(location)}},
    }
    return location


@pytest.fixture
def api(cast):
    client = APIClient()
    token = api_token_create(user=cast.bob, name="t")[1]
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def _adapter(run, *, version: int = 1, weights: bytes = b"w" * 300) -> list[Artifact]:
    return [
        artifacts.artifact_insert(
            run_id=run.id, kind=ArtifactKind.ADAPTER, name=name, data=data, version=version
        )
        for name, data in (
            ("adapter_config.json", b'{"peft_type": "LORA"}'),
            ("adapter_model.safetensors", weights),
        )
    ]


def _flip(artifact: Artifact) -> None:
    chunk = ArtifactChunk.objects.get(artifact=artifact, index=0)
    data = bytearray(chunk.data)
    data[7] ^= 1
    ArtifactChunk.objects.filter(id=chunk.id).update(data=bytes(data))


def test_a_flipped_adapter_byte_is_refused_everywhere_and_the_page_says_so(cast, make_run, client):
    run = make_run(status=RunStatus.SUCCEEDED)
    config, weights = _adapter(run)
    page = reverse("run_detail", args=[run.id])
    client.force_login(cast.bob)
    before = client.get(page).content.decode()
    assert "Download adapter" in before and "Damaged" not in before

    _flip(weights)
    html = client.get(page).content.decode()
    assert "Damaged file:" in html and "adapter_model.safetensors" in html
    assert "Download adapter" not in html  # no button to bytes we will not serve
    zipped = client.get(reverse("run_adapter_download", args=[run.id]))
    assert zipped.status_code == 409 and b"adapter_model.safetensors is damaged" in zipped.content

    _, secret = services.share_link_create(
        user=cast.bob, team=cast.acme, scope=ShareScope.RUN, run=run
    )
    client.logout()
    shared_page = client.get(reverse("share_view", args=[secret])).content.decode()
    assert "Damaged file:" in shared_page
    shared = client.get(reverse("share_adapter", args=[secret]))
    assert shared.status_code == 409

    token = api_token_create(user=cast.bob, name="t")[1]
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    listed = api.get(reverse("api-run-artifacts", args=[run.id])).json()
    damaged = {row["name"]: row["damaged"] for row in listed}
    assert "fails its sha256 check" in damaged["adapter_model.safetensors"]
    assert damaged["adapter_config.json"] == ""
    answer = api.get(reverse("api-artifact-download", args=[weights.id]))
    assert answer.status_code == 409 and "is damaged" in answer.json()["detail"]
    # The intact file of the same adapter is still served, and passes.
    assert api.get(reverse("api-artifact-download", args=[config.id])).status_code == 200


def test_a_damage_found_while_streaming_is_recorded_on_the_row(root, make_run):
    run = make_run(status=RunStatus.SUCCEEDED)
    stored = store.store_write(
        store.store_key(run_id=run.id, kind="merged", name="m.bin"), b"m" * 64
    )
    artifact = artifacts.artifact_record(
        run_id=run.id, kind=ArtifactKind.MERGED, name="m.bin", version=1, file=stored
    )
    assert artifacts.artifact_verify(artifact) == ""
    artifact.refresh_from_db()
    assert artifact.checked_at is not None and artifact.damaged == ""
    (root / stored.key).write_bytes(b"M" + b"m" * 63)
    assert "fails its sha256 check" in artifacts.artifact_verify(artifact)
    artifact.refresh_from_db()
    assert "fails its sha256 check" in artifact.damaged
    (root / stored.key).unlink()
    assert "missing" in artifacts.artifact_verify(artifact)


def _store_file(root, run, data: bytes, monkeypatch, block: int = 100) -> Artifact:
    monkeypatch.setattr(store, "BLOCK_BYTES", block)
    key = store.store_key(run_id=run.id, kind="merged", name="model.safetensors")
    stored = store.store_write(key, data)
    assert len(stored.blocks) == -(-len(data) // block)
    assert stored.blocks[0] == hashlib.sha256(data[:block]).hexdigest()
    return artifacts.artifact_record(
        run_id=run.id, kind=ArtifactKind.MERGED, name="model.safetensors", version=1, file=stored
    )


def test_ranges_of_a_store_file_are_served_block_verified(root, make_run, api, monkeypatch):
    run = make_run(status=RunStatus.SUCCEEDED)
    data = os.urandom(1000)
    artifact = _store_file(root, run, data, monkeypatch)
    url = reverse("api-artifact-download", args=[artifact.id])

    head = api.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head["Content-Length"] == "1000" and head["Accept-Ranges"] == "bytes"
    assert head["ETag"] == f'"{artifact.sha256}"'

    for header, start, stop in [
        ("bytes=150-349", 150, 350),
        ("bytes=990-", 990, 1000),
        ("bytes=-5", 995, 1000),
        ("bytes=0-5000", 0, 1000),
    ]:
        part = api.get(url, HTTP_RANGE=header)
        assert part.status_code == 206, header
        assert part.content == data[start:stop]
        assert part["Content-Range"] == f"bytes {start}-{stop - 1}/1000"
    assert api.get(url, HTTP_RANGE="bytes=1000-").status_code == 416
    # If-Range with another version's ETag: the whole file, not a piece of the wrong one.
    whole = api.get(url, HTTP_RANGE="bytes=0-9", HTTP_IF_RANGE='"other"')
    assert whole.status_code == 200 and whole.content == data

    damaged = bytearray(data)
    damaged[420] ^= 1  # block 4 (bytes 400-499)
    (root / artifact.key).write_bytes(bytes(damaged))
    assert api.get(url, HTTP_RANGE="bytes=100-199").content == data[100:200]  # block 1 is good
    refused = api.get(url, HTTP_RANGE="bytes=350-449")
    assert refused.status_code == 409 and "is damaged" in refused.json()["detail"]
    assert api.get(url).status_code == 409
    artifact.refresh_from_db()
    assert "block 4" in artifact.damaged or "sha256" in artifact.damaged


def test_a_big_range_streams_and_is_cut_at_the_damaged_block(root, make_run, monkeypatch):
    run = make_run(status=RunStatus.SUCCEEDED)
    data = os.urandom(1000)
    artifact = _store_file(root, run, data, monkeypatch)
    damaged = bytearray(data)
    damaged[620] ^= 1
    (root / artifact.key).write_bytes(bytes(damaged))
    received = []
    with pytest.raises(artifacts.ArtifactDamaged, match="block 6"):
        for chunk in artifacts.artifact_range(artifact, start=50, stop=900):
            received.append(chunk)
    assert b"".join(received) == data[50:600]  # blocks 0-5, never a byte of block 6


def test_a_missing_store_file_is_a_409_before_any_header_even_for_head(
    root, make_run, api, monkeypatch
):
    run = make_run(status=RunStatus.SUCCEEDED)
    artifact = _store_file(root, run, b"x" * 250, monkeypatch)
    (root / artifact.key).unlink()
    url = reverse("api-artifact-download", args=[artifact.id])
    assert api.head(url).status_code == 409
    assert api.get(url, HTTP_RANGE="bytes=0-9").status_code == 409


def test_a_database_file_ignores_ranges_and_sends_itself_whole(make_run, api):
    run = make_run(status=RunStatus.SUCCEEDED)
    _, weights = _adapter(run)
    answer = api.get(reverse("api-artifact-download", args=[weights.id]), HTTP_RANGE="bytes=0-9")
    assert answer.status_code == 200 and answer.content == b"w" * 300
    assert answer["Accept-Ranges"] == "none"


def test_each_adapter_version_is_kept_listed_and_downloadable(cast, make_run, api, client):
    run = make_run(status=RunStatus.SUCCEEDED)
    _adapter(run, version=1, weights=b"1" * 50)
    _adapter(run, version=2, weights=b"2" * 60)
    rows = api.get(reverse("api-run-artifacts", args=[run.id]), {"kind": "adapter"}).json()
    assert sorted((r["name"], r["version"]) for r in rows) == [
        ("adapter_config.json", 1),
        ("adapter_config.json", 2),
        ("adapter_model.safetensors", 1),
        ("adapter_model.safetensors", 2),
    ]
    only_1 = api.get(reverse("api-run-artifacts", args=[run.id]), {"version": 1}).json()
    assert {r["version"] for r in only_1} == {1}
    assert api.get(reverse("api-run-artifacts", args=[run.id]), {"version": 0}).status_code == 400
    assert (
        artifacts.artifact_files(run_id=run.id, kind="adapter")["adapter_model.safetensors"]
        == b"2" * 60
    )

    client.force_login(cast.bob)
    url = reverse("run_adapter_download", args=[run.id])
    import io
    import zipfile

    def weights_in(response) -> bytes:
        archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
        return archive.read("adapter_model.safetensors")

    assert weights_in(client.get(url)) == b"2" * 60
    assert weights_in(client.get(url, {"version": 1})) == b"1" * 50
    assert client.get(url, {"version": 3}).status_code == 404
    assert client.get(url, {"version": "../1"}).status_code == 404
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert "2 adapter versions" in page and "version 2" in page


def test_a_resumed_runs_adapter_adds_a_version_instead_of_replacing(make_run):
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w1:1")
    version = leases.artifact_version_next(run_id=run.id, fence=fence, kind=ArtifactKind.ADAPTER)
    leases.artifact_store(
        run_id=run.id, fence=fence, kind="adapter", name="a.bin", data=b"one", version=version
    )
    leases.artifact_store(  # a retried write of the same attempt replaces only itself
        run_id=run.id, fence=fence, kind="adapter", name="a.bin", data=b"one!", version=version
    )
    second = leases.artifact_version_next(run_id=run.id, fence=fence, kind=ArtifactKind.ADAPTER)
    leases.artifact_store(
        run_id=run.id, fence=fence, kind="adapter", name="a.bin", data=b"two", version=second
    )
    assert (version, second) == (1, 2)
    assert artifacts.artifact_files(run_id=run.id, kind="adapter", version=1) == {"a.bin": b"one!"}
    assert artifacts.artifact_files(run_id=run.id, kind="adapter") == {"a.bin": b"two"}


def test_a_deployment_can_send_adapters_to_the_store(root, settings, make_run):
    settings.ADAPTERS_IN_STORE = True
    run = make_run()
    fence = leases.run_claim(run_id=run.id, worker="w1:1")
    leases.artifact_store(run_id=run.id, fence=fence, kind="adapter", name="a.bin", data=b"big")
    artifact = Artifact.objects.get(run=run)
    assert artifact.home == ArtifactHome.STORE and (root / artifact.key).read_bytes() == b"big"
    assert not ArtifactChunk.objects.filter(artifact=artifact).exists()
    assert artifacts.artifact_files(run_id=run.id, kind="adapter") == {"a.bin": b"big"}


def test_each_merged_version_downloads_by_number_and_a_damaged_one_is_a_409(
    root, cast, make_run, api, client
):
    import io
    import zipfile

    from webapp.experiments.models import ExportStatus, MergedExport

    run = make_run(status=RunStatus.SUCCEEDED)
    _adapter(run)
    for version in (1, 2):
        data = f"weights v{version}".encode()
        key = store.store_key(run_id=run.id, kind="merged", name="model.safetensors")
        artifacts.artifact_record(
            run_id=run.id,
            kind="merged",
            name="model.safetensors",
            version=version,
            file=store.store_write(key, data),
        )
    MergedExport.objects.create(run=run, status=ExportStatus.READY, attempt=2)

    def weights(response) -> bytes:
        zipped = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
        return zipped.read("model.safetensors")

    client.force_login(cast.bob)
    page = reverse("run_merged_download", args=[run.id])
    api_url = reverse("api-run-merged", args=[run.id])
    assert weights(client.get(page)) == weights(api.get(api_url)) == b"weights v2"
    assert weights(client.get(page, {"version": 1})) == b"weights v1"
    assert weights(api.get(api_url, {"version": 1})) == b"weights v1"
    assert client.get(page, {"version": 7}).status_code == 404
    assert api.get(api_url, {"version": 7}).status_code == 404
    assert api.get(api_url, {"version": "x"}).status_code == 400

    newest = Artifact.objects.get(run=run, kind="merged", version=2)
    (root / newest.key).write_bytes(b"weights v3")  # same size, other bytes
    assert client.get(page).status_code == 409
    assert api.get(api_url).status_code == 409
    assert weights(client.get(page, {"version": 1})) == b"weights v1"  # the old one is intact
