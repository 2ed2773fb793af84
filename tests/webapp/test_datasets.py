"""Dataset upload: a valid file is parsed and previewed; a malformed line is refused by number."""

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
