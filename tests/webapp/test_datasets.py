"""Dataset upload: a valid file is parsed and previewed; a malformed line is refused by number."""

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from webapp.experiments.models import Dataset

pytestmark = pytest.mark.django_db


def _upload(client, cast, name: str, content: bytes, task: str = "causal-lm"):
    return client.post(
        reverse("dataset_upload"),
        {
            "name": "my data",
            "team": cast.acme.id,
            "task": task,
            "file": SimpleUploadedFile(name, content),
        },
    )


def test_csv_upload_is_stored_and_previewed(client, cast):
    client.force_login(cast.bob)
    csv = b"text,label\ngreat film,positive\nawful plot,negative\nfine acting,positive\n"
    response = _upload(client, cast, "reviews.csv", csv, task="seq-cls")
    dataset = Dataset.objects.get(team=cast.acme)
    assert response.status_code == 302
    assert (dataset.row_count, dataset.label_names) == (3, ["negative", "positive"])
    page = client.get(reverse("dataset_detail", args=[dataset.id])).content.decode()
    assert "awful plot" in page and "reviews.csv" in page


def test_malformed_jsonl_line_is_named_and_nothing_stored(client, cast):
    client.force_login(cast.alice)
    lines = [b'{"prompt": "a", "completion": "b"}', b'{"prompt": "c", "completion": "d"}']
    content = b"\n".join([*lines, b'{"prompt": "broken", ', lines[0]]) + b"\n"
    response = _upload(client, cast, "bad.jsonl", content)
    assert response.status_code == 400
    assert "line 3" in response.content.decode()
    assert not Dataset.objects.filter(team=cast.acme).exists()


def test_unknown_extension_is_refused(client, cast):
    client.force_login(cast.alice)
    response = _upload(client, cast, "../../etc/passwd", b"prompt,completion\na,b\n")
    assert response.status_code == 400
    assert "csv" in response.content.decode()
    assert not Dataset.objects.filter(team=cast.acme).exists()


def test_viewer_cannot_upload(client, cast):
    client.force_login(cast.carol)
    response = _upload(client, cast, "ok.csv", b"prompt,completion\na,b\n")
    assert response.status_code == 400
    assert not Dataset.objects.filter(team=cast.acme).exists()


def test_builtin_samples_are_listed_and_previewed(client, cast):
    client.force_login(cast.mallory)
    listing = client.get(reverse("datasets")).content.decode()
    assert "sample-instructions" in listing and "sample-sentiment" in listing
    dataset = cast.datasets["sample-sentiment"]
    page = client.get(reverse("dataset_detail", args=[dataset.id])).content.decode()
    assert "positive" in page or "negative" in page


def test_a_path_in_the_file_name_is_kept_only_as_its_last_part(client, cast):
    client.force_login(cast.alice)
    for name in ("../../etc/passwd.csv", "..\\..\\win\\x.csv"):
        response = _upload(client, cast, name, b"prompt,completion\na,b\n")
        assert response.status_code == 302
    names = set(Dataset.objects.filter(team=cast.acme).values_list("original_name", flat=True))
    assert names == {"passwd.csv", "x.csv"}


def test_a_refused_file_keeps_the_other_fields_and_names_line_and_column(client, cast):
    client.force_login(cast.alice)
    content = b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": }\n'
    page = _upload(client, cast, "bad.jsonl", content).content.decode()
    assert "line 2, column 31: invalid JSON" in page
    assert 'value="my data"' in page


def test_an_oversized_body_is_refused_unread_with_the_fields_page(client, cast, settings):
    settings.DATASET_MAX_BYTES = 1024
    client.force_login(cast.alice)
    response = _upload(client, cast, "big.csv", b"prompt,completion\n" + b"a,b\n" * 20_000)
    assert response.status_code == 413
    assert "larger than" in response.content.decode()
    assert not Dataset.objects.filter(team=cast.acme).exists()


def test_a_file_just_over_the_limit_is_refused_by_the_form(client, cast, settings):
    settings.DATASET_MAX_BYTES = 1024
    client.force_login(cast.alice)
    response = _upload(client, cast, "big.csv", b"prompt,completion\n" + b"a,b\n" * 300)
    assert response.status_code == 400 and "larger than" in response.content.decode()
    assert not Dataset.objects.filter(team=cast.acme).exists()


def test_the_upload_page_still_checks_csrf(cast):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(cast.alice)
    response = _upload(client, cast, "ok.csv", b"prompt,completion\na,b\n")
    assert response.status_code == 403
    assert not Dataset.objects.filter(team=cast.acme).exists()


def test_rows_download_as_an_attachment_under_a_server_name(client, cast):
    client.force_login(cast.alice)
    rows = b'{"prompt": "a\xe2\x80\xa8b", "completion": "<script>x</script>"}\n'
    _upload(client, cast, "../evil name.html.jsonl", rows)
    dataset = Dataset.objects.get(team=cast.acme)
    page = client.get(reverse("dataset_detail", args=[dataset.id])).content.decode()
    assert reverse("dataset_download", args=[dataset.id]) in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page  # a U+2028 in a value keeps one row
    response = client.get(reverse("dataset_download", args=[dataset.id]))
    assert response["Content-Disposition"] == f'attachment; filename="dataset-{dataset.id}.jsonl"'
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Content-Type"] == "application/x-ndjson"
    body = response.content.decode()
    assert [json.loads(line) for line in body.splitlines()] == [
        {"prompt": "a\u2028b", "completion": "<script>x</script>"}
    ]
    client.force_login(cast.mallory)
    assert client.get(reverse("dataset_download", args=[dataset.id])).status_code == 404


def test_builtin_rows_download_too(client, cast):
    client.force_login(cast.mallory)
    dataset = cast.datasets["sample-sentiment"]
    lines = client.get(reverse("dataset_download", args=[dataset.id])).content.splitlines()
    assert len(lines) == dataset.row_count
    assert set(json.loads(lines[0])) == {"text", "label"}


# --- the same through the API ----------------------------------------------------


@pytest.fixture
def bob_api(cast):
    from rest_framework.test import APIClient

    from webapp.accounts.services import api_token_create

    _, plain = api_token_create(user=cast.bob, name="t")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plain}")
    return client


def _api_upload(client, cast, name: str, content: bytes):
    body = {"name": "d", "team": cast.acme.id, "task": "causal-lm"}
    return client.post(reverse("api-datasets"), body | {"file": SimpleUploadedFile(name, content)})


def test_api_upload_error_names_line_and_column(cast, bob_api):
    response = _api_upload(bob_api, cast, "x.jsonl", b'{"prompt": "a", "completion": 1}\n')
    assert response.status_code == 400
    assert response.json() == {"detail": "line 1: column 'completion' must be a string, got int"}
    response = _api_upload(bob_api, cast, "x.jsonl", b'{"prompt": "a",, "completion": "b"}\n')
    assert response.json()["detail"].startswith("line 1, column 16: invalid JSON")
    assert not Dataset.objects.filter(team=cast.acme).exists()


def test_api_upload_over_the_limit_is_a_413(cast, bob_api, settings):
    settings.DATASET_MAX_BYTES = 1024
    response = _api_upload(bob_api, cast, "x.csv", b"prompt,completion\n" + b"a,b\n" * 20_000)
    assert response.status_code == 413 and "larger than" in response.json()["detail"]
    assert not Dataset.objects.filter(team=cast.acme).exists()


def test_api_upload_keeps_a_sanitized_name_and_downloads_rows(cast, bob_api):
    response = _api_upload(bob_api, cast, "../../etc/passwd.csv", b"prompt,completion\na,b\n")
    assert response.status_code == 201 and response.json()["original_name"] == "passwd.csv"
    download = bob_api.get(response.json()["download_url"])
    assert download["Content-Disposition"].endswith(f'"dataset-{response.json()["id"]}.jsonl"')
    assert download["X-Content-Type-Options"] == "nosniff"
    assert json.loads(download.content) == {"prompt": "a", "completion": "b"}
