"""peftlab.client against the real API, in process (see conftest.py)."""

import hashlib

import pytest

from peftlab.client import ApiError, Client, DownloadError, ServerUnreachable, login
from webapp.experiments import leases
from webapp.experiments.models import Artifact, ArtifactChunk, MetricPoint, Run

pytestmark = pytest.mark.django_db(transaction=True)


def _store_adapter(run_id: int, files: dict[str, bytes]) -> None:
    fence = leases.run_claim(run_id=run_id, worker="test")
    for name, data in files.items():
        leases.artifact_store(run_id=run_id, fence=fence, kind="adapter", name=name, data=data)


def _hostile_artifact(run_id: int, name: str, data: bytes = b"x", sha256: str | None = None):
    """A row the server would never write itself: stored directly, bypassing artifact_store."""
    artifact = Artifact.objects.create(
        run_id=run_id,
        kind="adapter",
        name=name,
        size=len(data),
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
    )
    ArtifactChunk.objects.create(artifact=artifact, index=0, data=data)


def test_me_names_the_user_and_team(client):
    me = client.me()
    assert me["username"] == "alice"
    assert [(t["name"], t["role"]) for t in me["teams"]] == [("Acme", "owner")]


def test_login_creates_a_token_that_works(transport, server_url, cast):
    token = login(server_url, "bob", "bob-pw-9", "laptop", transport=transport)
    assert token.startswith("plt_")
    with Client(server_url, token, transport=transport) as client:
        assert client.me()["username"] == "bob"


def test_wrong_password_is_an_api_error(transport, server_url, cast):
    with pytest.raises(ApiError) as caught:
        login(server_url, "bob", "wrong", "laptop", transport=transport)
    assert caught.value.status in (400, 401)


def test_bad_token_is_401(transport, server_url, cast):
    with Client(server_url, "plt_not-a-token", transport=transport) as client:
        with pytest.raises(ApiError) as caught:
            client.me()
    assert caught.value.status == 401


def test_catalogue_lists(client):
    assert "tiny-llama" in {m["key"] for m in client.models()}
    methods = {m["key"]: m for m in client.methods()}
    assert "r" in methods["lora"]["fields"]
    assert [p["name"] for p in client.projects()] == ["Default"]


def test_runs_follow_every_page(client, sample_id):
    for i in range(5):
        client.launch_run(base_model="tiny-llama", dataset=sample_id, method="lora", name=f"r{i}")
    runs = list(client.runs(limit=2))
    assert sorted(r["name"] for r in runs) == [f"r{i}" for i in range(5)]
    assert [r["name"] for r in client.runs(q="r3")] == ["r3"]


def test_launch_validation_error_reads_as_one_line(client, sample_id):
    with pytest.raises(ApiError) as caught:
        client.launch_run(
            base_model="tiny-llama", dataset=sample_id, method="lora", method_config={"r": 0}
        )
    assert caught.value.status == 400
    assert caught.value.body == {
        "method_config": {"r": ["Ensure this value is greater than or equal to 1."]}
    }
    assert str(caught.value) == (
        "400: method_config.r: Ensure this value is greater than or equal to 1."
    )


def test_uploaded_dataset_is_listed(client, cast, tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,completion\nhi,hello\nbye,goodbye\n")
    created = client.dataset_upload(csv, name="pairs", team=cast.acme.id, task="causal-lm")
    assert created["row_count"] == 2
    assert "pairs" in {d["name"] for d in client.datasets()}


def test_external_run_ingest_in_batches_and_finish(client, sample_id):
    run = client.launch_run(
        base_model="tiny-llama",
        dataset=sample_id,
        method="lora",
        train_config={"steps": 12_000},
        external=True,
    )
    assert run["status"] == "running" and run["external"]
    # 12,000 points: more than the server takes in one request, so the client must split them.
    points = [{"key": "train_loss", "step": s, "value": 1 / s} for s in range(1, 12_001)]
    assert client.ingest_metrics(run["id"], points) == 12_000
    assert MetricPoint.objects.filter(run_id=run["id"]).count() == 12_000
    series = client.metrics(run["id"], keys=["train_loss"], max_points=100)
    assert 0 < len(series["train_loss"]["step"]) <= 100
    finished = client.finish_run(run["id"], "succeeded", summary={"note": "done elsewhere"})
    assert finished["status"] == "succeeded" and finished["step"] == 12_000


def test_metrics_without_keys_follows_the_pages_of_keys(client, sample_id, settings):
    settings.METRIC_KEYS_PER_PAGE = 2
    run = client.launch_run(
        base_model="tiny-llama", dataset=sample_id, method="lora", external=True
    )
    keys = ["a", "b", "c", "d", "e"]
    client.ingest_metrics(run["id"], [{"key": k, "step": 3, "value": 0.5} for k in keys])
    series = client.metrics(run["id"])  # three pages on the server
    assert series == {key: {"step": [3], "value": [0.5]} for key in keys}


def test_watch_polls_until_the_run_finishes(client, sample_id):
    run = client.launch_run(
        base_model="tiny-llama", dataset=sample_id, method="lora", external=True
    )
    seen = []
    for current in client.watch(run["id"], interval=0.01):
        seen.append(current["status"])
        if len(seen) == 2:  # finished between two polls, as a trainer elsewhere would
            client.finish_run(run["id"], "failed")
    assert seen == ["running", "running", "failed"]


def test_watch_rides_out_a_server_restart(flaky_client, queued_run, caplog):
    client = flaky_client(3)
    client.retry_delays = (0.0,) * 4
    Run.objects.filter(id=queued_run["id"]).update(status="failed")
    assert [r["status"] for r in client.watch(queued_run["id"])] == ["failed"]
    retries = [r.getMessage() for r in caplog.records if r.name == "peftlab.client"]
    assert retries == ["cannot reach http://testserver ([Errno 111] Connection refused); "
                       "trying again in 0 s"] * 3  # fmt: skip


def test_watch_gives_up_when_the_server_stays_down(flaky_client, queued_run):
    client = flaky_client(100)
    client.retry_delays = (0.0,) * 3
    with pytest.raises(ServerUnreachable, match="make run"):
        next(client.watch(queued_run["id"]))


def test_download_writes_identical_verified_files(client, queued_run, tmp_path):
    weights = bytes(range(256)) * (20 * 1024)  # 5 MiB: more than one stored chunk
    config = b'{"peft_type": "LORA", "r": 4}'
    _store_adapter(
        queued_run["id"], {"adapter_config.json": config, "adapter_model.safetensors": weights}
    )
    paths = client.download_adapter(queued_run["id"], tmp_path / "out")
    assert sorted(p.name for p in paths) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "out" / "adapter_config.json").read_bytes() == config
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)


@pytest.mark.parametrize("name", ["../evil", "sub/evil", ".bashrc", "..", "a\\b"])
def test_download_refuses_a_name_that_is_not_a_plain_file(client, queued_run, tmp_path, name):
    _hostile_artifact(queued_run["id"], "adapter_config.json")
    _hostile_artifact(queued_run["id"], name)
    with pytest.raises(DownloadError, match="not a plain file name"):
        client.download_adapter(queued_run["id"], tmp_path / "out")
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_download_refuses_a_damaged_file(client, queued_run, tmp_path):
    _hostile_artifact(queued_run["id"], "adapter_model.safetensors", b"weights", sha256="0" * 64)
    with pytest.raises(DownloadError, match="damaged"):
        client.download_adapter(queued_run["id"], tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temp name is left


def test_another_teams_run_is_404(client, cast, sample_id):
    theirs = Run.objects.create(
        project=cast.umbrella_project,
        name="theirs",
        base_model="tiny-llama",
        dataset_id=sample_id,
        method="lora",
    )
    with pytest.raises(ApiError) as caught:
        client.run(theirs.id)
    assert caught.value.status == 404
    with pytest.raises(ApiError):
        client.cancel_run(theirs.id)
    assert Run.objects.get(id=theirs.id).status == "queued"


def test_delete_run_once_it_has_ended(client, queued_run):
    with pytest.raises(ApiError, match="^409: "):
        client.delete_run(queued_run["id"])
    assert client.cancel_run(queued_run["id"])["status"] == "cancelled"
    assert client.delete_run(queued_run["id"]) is None
    assert not Run.objects.filter(id=queued_run["id"]).exists()


def test_sweep_launch_and_read(client, sample_id):
    sweep = client.launch_sweep(
        base_model="tiny-llama",
        dataset=sample_id,
        methods=["lora", "ia3"],
        grid={"lora.r": [4, 8]},
        train_config={"steps": 5},
        name="compare",
    )
    assert len(sweep["runs"]) == 3
    assert {r["id"] for r in client.sweep(sweep["id"])["runs"]} == {r["id"] for r in sweep["runs"]}
    assert [s["id"] for s in client.sweeps()] == [sweep["id"]]
