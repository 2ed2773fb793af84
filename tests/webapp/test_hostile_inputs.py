"""Every class of hostile input in one place, each answered with a clear 4xx or stored as inert
text, and each shown to change nothing it should not (row counts before and after):

- path-traversal file names on dataset upload (page, API, service): the rows are stored, the
  name only as its last path part; nothing is written to disk;
- oversized bodies: a dataset over the limit (page 413, API 413) and a JSON body over
  DATA_UPLOAD_MAX_MEMORY_SIZE (413 on metric ingest, a 4xx elsewhere), refused unread;
- script payloads in every user-visible field, escaped on every page that shows them;
- JSON nested past the decoder's recursion limit: a 400 on every JSON endpoint;
- spreadsheet formulas in the CSV export, written with a leading quote;
- a pickle renamed `.safetensors` (tests/webapp/test_adapter_upload.py): "not a safetensors
  file", never unpickled.

The parsers and the ingest API are also fuzzed with hypothesis (tests/fuzz).
"""

import csv
import io
import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from django.utils.html import escape
from rest_framework.test import APIClient

from webapp.accounts.models import Team
from webapp.accounts.services import api_token_create, project_create, team_create
from webapp.experiments import services
from webapp.experiments.models import Comment, Dataset, MetricPoint, Run, RunStatus, Sweep, Tag

pytestmark = pytest.mark.django_db

SCRIPT = "<script>alert('{}')</script>"
IMG = "<img src=x onerror=alert('{}')>"
CSV_BODY = b"prompt,completion\na,b\n"


def _counts() -> dict[str, int]:
    models = (Dataset, Run, MetricPoint, Tag, Comment, Sweep, Team)
    return {model.__name__: model.objects.count() for model in models}


def _api(user) -> APIClient:
    _, plain = api_token_create(user=user, name="hostile")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plain}")
    return client


def _page_upload(client, cast, filename: str, content: bytes):
    body = {"name": "d", "team": cast.acme.id, "task": "causal-lm"}
    return client.post(
        reverse("dataset_upload"), body | {"file": SimpleUploadedFile(filename, content)}
    )


def _api_upload(client, cast, filename: str, content: bytes):
    body = {"name": "d", "team": cast.acme.id, "task": "causal-lm"}
    return client.post(
        reverse("api-datasets"), body | {"file": SimpleUploadedFile(filename, content)}
    )


# --- path traversal ----------------------------------------------------------------


TRAVERSALS = ["../../etc/passwd.csv", "..\\..\\x.csv", "/abs/olute.csv", "a/./../b.csv"]


@pytest.mark.parametrize("filename", TRAVERSALS)
def test_traversal_file_names_keep_only_their_last_part(
    client, cast, filename, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # nothing may appear here, nor anywhere on disk
    client.force_login(cast.alice)
    before = _counts()
    assert _page_upload(client, cast, filename, CSV_BODY).status_code == 302
    assert _api_upload(_api(cast.alice), cast, filename, CSV_BODY).status_code == 201
    expected = filename.replace("\\", "/").rsplit("/", 1)[-1]
    names = list(Dataset.objects.filter(team=cast.acme).values_list("original_name", flat=True))
    assert names == [expected, expected]
    assert _counts() == before | {"Dataset": before["Dataset"] + 2}
    assert list(tmp_path.iterdir()) == []


def test_the_service_strips_paths_and_control_characters_itself(cast):
    dataset = services.dataset_upload_create(
        user=cast.alice,
        team=cast.acme,
        name="d",
        filename="..\\../\x1b[31mred\u202egnp.csv",
        data=CSV_BODY,
        task="causal-lm",
    )
    assert dataset.original_name == "[31mredgnp.csv"


def test_a_name_that_is_only_a_path_is_refused_and_stores_nothing(cast):
    before = _counts()
    with pytest.raises(services.ValidationError, match="csv or .jsonl"):
        services.dataset_upload_create(
            user=cast.alice,
            team=cast.acme,
            name="d",
            filename="../..",
            data=CSV_BODY,
            task="causal-lm",
        )
    assert _counts() == before


# --- oversized bodies ---------------------------------------------------------------


def test_an_oversized_dataset_is_a_413_on_the_page_and_the_api(client, cast, settings):
    settings.DATASET_MAX_BYTES = 2048
    client.force_login(cast.alice)
    big = CSV_BODY + b"a,b\n" * 30_000  # past the limit and the room for the other fields
    before = _counts()
    page = _page_upload(client, cast, "big.csv", big)
    assert page.status_code == 413 and "larger than" in page.content.decode()
    api = _api_upload(_api(cast.alice), cast, "big.csv", big)
    assert api.status_code == 413 and "larger than" in api.json()["detail"]
    assert _counts() == before


def test_a_json_body_over_the_request_limit_is_refused(cast, settings):
    client = _api(cast.bob)
    body = {
        "name": "external",
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "method": "lora",
        "train_config": {"steps": 10},
        "external": True,
    }
    run_id = client.post(reverse("api-runs"), body, format="json").json()["id"]
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 32 * 1024
    before = _counts()
    points = [{"key": "train_loss", "step": i, "value": 1.0} for i in range(1000)]
    ingest = client.post(
        reverse("api-run-metrics", args=[run_id]), {"points": points}, format="json"
    )
    assert ingest.status_code == 413 and "larger than" in ingest.json()["detail"]
    padded = body | {"name": "x" * 40_000}
    assert 400 <= client.post(reverse("api-runs"), padded, format="json").status_code < 500
    assert _counts() == before


@pytest.mark.parametrize("route", ["api-runs", "api-sweeps", "api-auth-token"])
def test_json_nested_past_the_decoders_limit_is_a_400_on_every_endpoint(cast, route):
    before = _counts()
    body = "[" * 100_000 + "]" * 100_000
    response = _api(cast.bob).post(reverse(route), body, content_type="application/json")
    assert response.status_code == 400 and "nested too deeply" in response.json()["detail"]
    assert _counts() == before


# --- script payloads ------------------------------------------------------------------


FIELDS = ["run", "tag", "notes", "comment", "dataset", "filename", "team", "project", "sweep"]


def _payload(field: str, kind: str) -> str:
    return (SCRIPT if kind == "script" else IMG).format(field)


@pytest.mark.parametrize("kind", ["script", "img"])
def test_script_payloads_in_every_field_are_stored_as_text_and_escaped(client, cast, kind):
    p = {field: _payload(field, kind) for field in FIELDS}
    team = team_create(user=cast.alice, name=p["team"])
    project = project_create(user=cast.alice, team=team, name=p["project"])
    dataset = services.dataset_upload_create(
        user=cast.alice,
        team=team,
        name=p["dataset"],
        filename=p["filename"] + ".csv",
        data=CSV_BODY,
        task="causal-lm",
    )
    sweep = Sweep.objects.create(
        project=project, name=p["sweep"], base_model="tiny-llama", dataset=dataset
    )
    run = Run.objects.create(
        project=project,
        name=p["run"],
        base_model="tiny-llama",
        dataset=dataset,
        sweep=sweep,
        method="lora",
        method_config={"r": 8},
        train_config={"steps": 3},
        total_steps=3,
        status=RunStatus.SUCCEEDED,
        created_by=cast.alice,
    )
    services.run_tag_add(user=cast.alice, run=run, name=p["tag"][:50])
    services.run_notes_update(user=cast.alice, run=run, notes=p["notes"])
    services.comment_create(user=cast.alice, run=run, body=p["comment"])
    assert Run.objects.get(id=run.id).name == p["run"]  # stored as typed, not cleaned

    client.force_login(cast.alice)
    pages = [
        reverse("runs"),
        reverse("run_detail", args=[run.id]),
        reverse("sweep_detail", args=[sweep.id]),
        reverse("datasets"),
        reverse("dataset_detail", args=[dataset.id]),
        reverse("team_detail", args=[team.id]),
        reverse("compare") + f"?runs={run.id}",
    ]
    html = ""
    for url in pages:
        response = client.get(url)
        assert response.status_code == 200, url
        page = response.content.decode()
        assert "<script>alert(" not in page and "<img src=x" not in page, url
        html += page
    for field in FIELDS:
        shown = {"tag": p["tag"][:50], "filename": p["filename"].rsplit("/", 1)[-1] + ".csv"}
        shown = shown.get(field, p[field])
        assert escape(shown) in html or escape(shown).replace("&#x27;", "'") in html, field


# --- CSV formulas --------------------------------------------------------------------


@pytest.mark.parametrize("name", ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)", "\t=1"])
def test_formula_cells_in_the_csv_export_get_a_leading_quote(client, cast, make_run, name):
    run = make_run(name=name, status=RunStatus.SUCCEEDED, summary={"eval_loss": 1.0})
    client.force_login(cast.alice)
    before = _counts()
    response = client.get(reverse("compare_csv"), {"runs": [run.id]})
    assert response["Content-Disposition"].startswith("attachment;")
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert rows[0]["run"] == "'" + name
    assert _counts() == before


def test_a_formula_in_an_uploaded_dataset_stays_data_and_downloads_as_json(client, cast):
    client.force_login(cast.alice)
    _page_upload(client, cast, "f.csv", b"prompt,completion\n\"=cmd|' /c calc'!A1\",b\n")
    dataset = Dataset.objects.get(team=cast.acme)
    response = client.get(reverse("dataset_download", args=[dataset.id]))
    assert response["Content-Type"] == "application/x-ndjson"
    assert json.loads(response.content) == {"prompt": "=cmd|' /c calc'!A1", "completion": "b"}
