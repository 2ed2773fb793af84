"""Datasets as files in the artifact store: one streaming pass at upload, rows read back only
through the sha256 check, the cap in settings, the file deleted with the dataset."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from rest_framework.test import APIClient

from peft_core.data import DatasetError
from webapp.accounts.services import api_token_create
from webapp.experiments import dataset_files, selectors, services, store
from webapp.experiments.models import Dataset

pytestmark = pytest.mark.django_db

ROWS = b"text,label\ngreat film,positive\nawful plot,negative\nfine acting,positive\n"


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


def _upload(cast, data: bytes = ROWS, name: str = "reviews.csv", task: str = "seq-cls"):
    return services.dataset_upload_create(
        user=cast.alice, team=cast.acme, name="reviews", filename=name, data=data, task=task
    )


def _flip_a_byte(root, dataset: Dataset) -> None:
    path = root / dataset.file_key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_an_upload_is_a_jsonl_file_in_the_store_and_nothing_in_the_row(cast, root):
    dataset = _upload(cast)
    assert _files_under(root) == [dataset.file_key]
    assert dataset.file_key.startswith(f"datasets/{cast.acme.id}/")
    assert dataset.file_key.endswith("/rows.jsonl") and "reviews" not in dataset.file_key
    data = (root / dataset.file_key).read_bytes()
    assert [json.loads(line) for line in data.splitlines()] == [
        {"text": "great film", "label": "positive"},
        {"text": "awful plot", "label": "negative"},
        {"text": "fine acting", "label": "positive"},
    ]
    assert (dataset.file_size, dataset.file_sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert dataset.sha256 == hashlib.sha256(ROWS).hexdigest()  # of the upload, as before
    assert (dataset.row_count, dataset.columns) == (3, ["label", "text"])
    assert dataset.label_names == ["negative", "positive"]
    assert not hasattr(Dataset, "content")
    assert dataset_files.dataset_rows(dataset) == [json.loads(line) for line in data.splitlines()]
    assert selectors.dataset_jsonl(dataset=dataset) == data


def test_a_big_upload_spilled_to_disk_by_django_is_parsed_from_there(client, cast, root, settings):
    settings.FILE_UPLOAD_MAX_MEMORY_SIZE = 1024
    rows = b"prompt,completion\n" + b"".join(b"q%d,a%d\n" % (i, i) for i in range(5000))
    client.force_login(cast.alice)
    body = {"name": "big", "team": cast.acme.id, "task": "causal-lm"}
    response = client.post(
        reverse("dataset_upload"), body | {"file": SimpleUploadedFile("big.csv", rows)}
    )
    assert response.status_code == 302
    dataset = Dataset.objects.get(team=cast.acme)
    assert dataset.row_count == 5000 and dataset.sha256 == hashlib.sha256(rows).hexdigest()
    assert dataset_files.dataset_rows(dataset)[-1] == {"prompt": "q4999", "completion": "a4999"}


def test_a_file_over_the_cap_is_refused_with_the_cap_and_nothing_stored(
    client, cast, root, settings
):
    settings.DATASET_MAX_BYTES = 1024
    data = b"prompt,completion\n" + b"a,b\n" * 300
    with pytest.raises(ValidationError, match="larger than 1,024 bytes"):
        _upload(cast, data, name="big.csv", task="causal-lm")
    client.force_login(cast.alice)
    body = {"name": "big", "team": cast.acme.id, "task": "causal-lm"}
    page = client.post(
        reverse("dataset_upload"), body | {"file": SimpleUploadedFile("b.csv", data)}
    )
    assert page.status_code == 400 and "larger than 1,024 bytes" in page.content.decode()
    assert not Dataset.objects.filter(team=cast.acme).exists()
    assert _files_under(root) == []


def test_bytes_past_the_cap_are_refused_while_reading_whatever_size_was_declared(root, cast):
    """A source longer than its declared size stops at the cap, before anything is stored."""
    source = SimpleUploadedFile("x.csv", b"prompt,completion\n" + b"a,b\n" * 3000)
    with pytest.raises(DatasetError, match="larger than 2,000 bytes"):
        dataset_files.dataset_file_write(
            source=source,
            fmt="csv",
            task="causal-lm",
            team_id=cast.acme.id,
            max_bytes=2000,
            max_rows=10_000,
        )
    assert _files_under(root) == []


def test_the_form_states_the_cap_from_settings(client, cast, settings):
    settings.DATASET_MAX_BYTES = 2 * 1024**3
    client.force_login(cast.alice)
    page = client.get(reverse("dataset_upload")).content.decode()
    assert "at most 2 GiB" in page and "At most 2 GiB" in page


def test_a_bad_line_stores_no_file(cast, root):
    with pytest.raises(ValidationError, match="line 5: 1 fields"):
        _upload(cast, ROWS + b"one field only\n", name="r.csv")
    assert _files_under(root) == [] and not Dataset.objects.filter(team=cast.acme).exists()


def test_a_flipped_byte_is_named_by_the_page_the_downloads_and_the_api(client, cast, root):
    dataset = _upload(cast)
    _flip_a_byte(root, dataset)
    client.force_login(cast.bob)
    page = client.get(reverse("dataset_detail", args=[dataset.id]))
    assert page.status_code == 200
    text = page.content.decode()
    assert "The dataset file is damaged" in text and "awful plot" not in text
    download = client.get(reverse("dataset_download", args=[dataset.id]))
    assert download.status_code == 409 and b"the dataset file is damaged" in download.content
    tokens = client.get(reverse("dataset_tokens", args=[dataset.id]), {"model": "tiny-llama"})
    assert "the dataset file is damaged" in tokens.content.decode()
    _, plain = api_token_create(user=cast.bob, name="t")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {plain}")
    answer = api.get(reverse("api-dataset", args=[dataset.id]))
    assert answer.status_code == 409 and "the dataset file is damaged" in answer.json()["detail"]
    answer = api.get(reverse("api-dataset-download", args=[dataset.id]))  # was a 500
    assert answer.status_code == 409 and "the dataset file is damaged" in answer.json()["detail"]
    with pytest.raises(dataset_files.DatasetDamaged):
        dataset_files.dataset_rows(dataset, limit=1)


def test_a_missing_file_is_a_409_before_the_body(client, cast, root):
    dataset = _upload(cast)
    (root / dataset.file_key).unlink()
    client.force_login(cast.bob)
    download = client.get(reverse("dataset_download", args=[dataset.id]))
    assert download.status_code == 409 and b"missing" in download.content


def test_a_download_past_the_whole_check_size_streams_and_is_cut_by_damage(
    client, cast, root, monkeypatch
):
    from webapp.experiments import dataset_views

    monkeypatch.setattr(dataset_views, "VERIFY_FIRST_BYTES", 10)
    dataset = _upload(cast)
    client.force_login(cast.bob)
    whole = client.get(reverse("dataset_download", args=[dataset.id]))
    assert whole["Content-Length"] == str(dataset.file_size)
    assert b"".join(whole.streaming_content) == (root / dataset.file_key).read_bytes()
    _flip_a_byte(root, dataset)
    cut = client.get(reverse("dataset_download", args=[dataset.id]))
    with pytest.raises(dataset_files.DatasetDamaged):
        b"".join(cut.streaming_content)


def test_deleting_a_dataset_deletes_its_file_once_committed(
    cast, root, django_capture_on_commit_callbacks
):
    dataset = _upload(cast)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.dataset_delete(user=cast.alice, dataset=dataset)
    assert _files_under(root) == [dataset.file_key]  # not before the commit
    for callback in callbacks:
        callback()
    assert _files_under(root) == [] and not Dataset.objects.filter(id=dataset.id).exists()


def test_builtin_datasets_have_no_file_and_still_preview_and_download(client, cast, root):
    dataset = cast.datasets["sample-sentiment"]
    assert dataset.file_key == "" and len(selectors.dataset_preview(dataset=dataset)) == 20
    client.force_login(cast.mallory)
    lines = client.get(reverse("dataset_download", args=[dataset.id])).content.splitlines()
    assert len(lines) == dataset.row_count and _files_under(root) == []


# --- memory -----------------------------------------------------------------------------

PARSE_IN_A_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import django
    django.setup()
    from webapp.experiments.dataset_files import dataset_file_write
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(sys.argv[1], "rb") as source:
        file = dataset_file_write(
            source=source, fmt="jsonl", task="causal-lm", team_id=1,
            max_bytes=2**31, max_rows=10**6,
        )
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"grew_kib": after - before, "rows": file.row_count,
                      "size": file.stored.size, "sha256": file.upload_sha256}))
    """
)
FILE_BYTES = 200 * 10**6
RSS_BOUND_MB = 50  # measured: ~6 MB of growth for the 200 MB file


def _write_jsonl(path, size: int) -> tuple[int, str]:
    """A JSON-lines file of about `size` bytes, every row different: (rows, sha256)."""
    pad = "x" * 1300
    digest, written, rows = hashlib.sha256(), 0, 0
    with path.open("wb") as out:
        while written < size:
            block = "".join(
                json.dumps({"prompt": f"q{rows + i} {pad}", "completion": f"a{rows + i}"}) + "\n"
                for i in range(1000)
            ).encode()
            out.write(block)
            digest.update(block)
            written, rows = written + len(block), rows + 1000
    return rows, digest.hexdigest()


def test_a_200_mb_upload_parses_with_flat_memory(tmp_path):
    """The parse runs in a fresh process, so its peak RSS (ru_maxrss) is the parse's own."""
    path = tmp_path / "big.jsonl"
    rows, sha256 = _write_jsonl(path, FILE_BYTES)
    env = os.environ | {
        "DJANGO_SETTINGS_MODULE": "webapp.settings",
        "PEFTLAB_ARTIFACT_STORE": f"file://{tmp_path / 'store'}",
    }
    try:
        child = subprocess.run(
            [sys.executable, "-c", PARSE_IN_A_CHILD, str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
    finally:  # pytest keeps the last runs' tmp_path: not 400 MB of them
        path.unlink()
        shutil.rmtree(tmp_path / "store", ignore_errors=True)
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert (report["rows"], report["sha256"]) == (rows, sha256)
    assert report["size"] > FILE_BYTES * 0.95  # the rows, re-written as JSON lines
    assert report["grew_kib"] / 1024 < RSS_BOUND_MB, report


# --- on an S3-compatible store ----------------------------------------------------------

S3_ENDPOINT = os.environ.get("PEFTLAB_TEST_S3_ENDPOINT_URL", "")
S3_BUCKET = os.environ.get("PEFTLAB_TEST_S3_BUCKET", "peftlab")


@pytest.fixture
def s3(settings, monkeypatch):
    """The store on the test server (CI starts one), under a fresh prefix."""
    if not S3_ENDPOINT:
        if settings.REQUIRE_SERVICES:
            pytest.fail("CI must test the S3 store: PEFTLAB_TEST_S3_ENDPOINT_URL is not set")
        pytest.skip("no S3-compatible server (PEFTLAB_TEST_S3_ENDPOINT_URL)")
    from webapp import settings as module

    for name, value in {
        "PEFTLAB_S3_ENDPOINT_URL": S3_ENDPOINT,
        "PEFTLAB_S3_REGION": "us-east-1",
        "PEFTLAB_S3_ACCESS_KEY_ID": os.environ.get("PEFTLAB_TEST_S3_ACCESS_KEY_ID", "S3RVER"),
        "PEFTLAB_S3_SECRET_ACCESS_KEY": os.environ.get("PEFTLAB_TEST_S3_SECRET", "S3RVER"),
    }.items():
        monkeypatch.setenv(name, value)
    prefix = f"test-{uuid.uuid4().hex}"
    storage = module.artifact_storage(f"s3://{S3_BUCKET}/{prefix}")
    settings.STORAGES = {**settings.STORAGES, "artifacts": storage}
    return store.artifact_storage().connection.meta.client, prefix


def test_on_s3_an_upload_is_one_object_read_back_checked(cast, s3):
    client, prefix = s3
    dataset = _upload(cast)
    listing = client.list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix + "/")
    assert [item["Key"] for item in listing["Contents"]] == [f"{prefix}/{dataset.file_key}"]
    assert dataset_files.dataset_rows(dataset, limit=1) == [
        {"text": "great film", "label": "positive"}
    ]
    damaged = selectors.dataset_jsonl(dataset=dataset).replace(b"great", b"grease")[:-1]
    client.put_object(Bucket=S3_BUCKET, Key=f"{prefix}/{dataset.file_key}", Body=damaged)
    with pytest.raises(dataset_files.DatasetDamaged, match="the dataset file is damaged"):
        dataset_files.dataset_rows(dataset)
