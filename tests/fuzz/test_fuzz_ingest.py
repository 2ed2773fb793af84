"""Hypothesis against the API's metric ingest and the dataset upload page: whatever the body,
the answer is below 500; the valid points of a batch are stored once, and replaying the batch
stores nothing new."""

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from webapp.accounts.services import api_token_create
from webapp.experiments.models import Dataset, MetricPoint

pytestmark = pytest.mark.django_db

FUZZ = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# JSON of any shape, a little deep, with numbers JSON cannot hold in a float.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=80)
    | st.sampled_from(["NaN", "inf", "-1", "1e999", "", "train_loss", "<script>"])
)
ANY_JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
KEYS = st.sampled_from(["train_loss", "eval/loss", "lr", "a.b-c_d"]) | st.text(max_size=70)
STEPS = st.integers(min_value=-5, max_value=2**31 + 5) | st.sampled_from([0, 1, 2, 2**31 - 1])
VALUES = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**400), 10**400)
POINT = st.fixed_dictionaries(
    {"key": KEYS, "step": STEPS, "value": VALUES},
    optional={"wall_time": VALUES | SCALARS, "extra": ANY_JSON},
)
BODY = (
    st.fixed_dictionaries({"points": st.lists(POINT | ANY_JSON, max_size=30)})
    | st.fixed_dictionaries({"points": ANY_JSON})
    | ANY_JSON
)


@pytest.fixture
def ingest(cast):
    """(client, url) of an external run of Acme, as bob."""
    _, plain = api_token_create(user=cast.bob, name="fuzz")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plain}")
    body = {
        "name": "external",
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "method": "lora",
        "train_config": {"steps": 10},
        "external": True,
    }
    run_id = client.post(reverse("api-runs"), body, format="json").json()["id"]
    return client, reverse("api-run-metrics", args=[run_id]), run_id


def _stored(run_id: int) -> set[tuple[str, int]]:
    return set(MetricPoint.objects.filter(run_id=run_id).values_list("key", "step"))


@FUZZ
@given(body=BODY)
def test_any_ingest_body_is_answered_below_500_and_stored_once(ingest, body):
    client, url, run_id = ingest
    raw = json.dumps(body)  # NaN and Infinity go out as JSON's non-standard literals
    before = _stored(run_id)
    response = client.post(url, raw, content_type="application/json")
    assert response.status_code < 500
    event(f"status {response.status_code}")
    after = _stored(run_id)
    if response.status_code != 200:
        assert after == before  # a refused batch stores nothing
        return
    sent = {(point["key"], int(point["step"])) for point in body["points"]}
    assert after == before | sent and response.json() == {"received": len(body["points"])}
    replay = client.post(url, raw, content_type="application/json")
    assert replay.status_code == 200 and _stored(run_id) == after
    assert MetricPoint.objects.filter(run_id=run_id).count() == len(after)


@FUZZ
@given(depth=st.integers(min_value=1, max_value=100_000), opener=st.sampled_from("[{"))
def test_deeply_nested_bodies_are_a_400(ingest, depth, opener):
    client, url, _ = ingest
    body = '{"points": ' + ("[" if opener == "[" else '{"a": ') * depth
    assert client.post(url, body, content_type="application/json").status_code == 400


UPLOAD = settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FILE_NAMES = st.sampled_from(
    ["d.csv", "d.jsonl", "d.ndjson", "../../d.csv", "..\\d.jsonl", "d.txt", "<b>.csv", "\x00.csv"]
) | st.text(max_size=40)
CONTENT = (
    st.binary(max_size=600)
    | st.text(max_size=300).map(lambda text: text.encode())
    | st.sampled_from(
        [
            b"text,label\na,b\nc,d\n",
            b'{"prompt": "a", "completion": "b"}\n',
            b"prompt,completion\na,b\n",
        ]
    )
)


RANDOM_UPLOAD = st.tuples(
    FILE_NAMES, CONTENT, st.sampled_from(["causal-lm", "seq-cls", "bogus"]), st.text(max_size=120)
)
GOOD_UPLOAD = st.tuples(
    st.sampled_from(["d.csv", "../../etc/d.csv", "..\\x\\d.csv", "<img src=x>.csv"]),
    st.sampled_from([b"prompt,completion\na,b\n", b"\xef\xbb\xbftext\r\nhello\r\n"]),
    st.just("causal-lm"),
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=100).filter(
        str.strip
    ),
)


@UPLOAD
@given(upload=GOOD_UPLOAD | RANDOM_UPLOAD)
def test_random_files_through_the_upload_page_are_never_a_500(client, cast, upload):
    name, content, task, title = upload
    client.force_login(cast.alice)
    before = Dataset.objects.count()
    response = client.post(
        reverse("dataset_upload"),
        {
            "name": title,
            "team": cast.acme.id,
            "task": task,
            "file": SimpleUploadedFile(name or "x", content),
        },
    )
    assert response.status_code in (302, 400)
    event(f"status {response.status_code}")
    assert Dataset.objects.count() == before + (response.status_code == 302)
