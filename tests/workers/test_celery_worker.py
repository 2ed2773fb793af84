"""A real Celery worker process on the configured broker and database (Redis and PostgreSQL
in CI; the filesystem transport and SQLite without services) takes a tiny-llama run from
queued to succeeded, and its adapter downloads."""

import io
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import safetensors.torch
from django.conf import settings
from django.db import connection
from django.urls import reverse

from webapp.celery import app as celery_app
from webapp.experiments import queue, services
from webapp.experiments.models import MetricPoint, Run, RunStatus

RUN_QUEUES = queue.worker_queues("any", 2)  # as `make run` starts its worker on a CPU box

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

TIMEOUT_S = 240


def database_env(host: str | None = None, port: int | None = None) -> dict:
    """The variables that point a subprocess at the test database (on another host or port
    if given, e.g. a proxy in front of PostgreSQL)."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return {"PEFTLAB_SQLITE_PATH": str(db["NAME"])}
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    host, port = host or db["HOST"], port or db["PORT"] or 5432
    return {"DATABASE_URL": f"postgres://{auth}@{host}:{port}/{db['NAME']}"}


def _worker_env() -> dict:
    return {**os.environ, **database_env()}


@pytest.fixture
def worker(tmp_path):
    with celery_app.connection_for_write() as conn:
        for name in RUN_QUEUES:
            conn.default_channel.queue_declare(name, durable=True, auto_delete=False)
            conn.default_channel.queue_purge(name)
    log = (tmp_path / "worker.log").open("w")
    command = [sys.executable, "-m", "celery", "-A", "webapp", "worker"]
    command += ["-Q", ",".join(RUN_QUEUES)]
    command += ["--concurrency", "1", "--without-gossip", "--without-mingle", "-l", "info"]
    process = subprocess.Popen(
        command, env=_worker_env(), stdout=log, stderr=subprocess.STDOUT, cwd=settings.BASE_DIR
    )
    yield process, tmp_path / "worker.log"
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_until_finished(run: Run, process, log_path) -> Run:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        run.refresh_from_db()
        if run.is_finished:
            return run
        assert process.poll() is None, f"worker died:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.5)
    pytest.fail(f"run still {run.status} after {TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")


def test_worker_takes_a_run_from_queued_to_downloaded(cast, worker, client):
    process, log_path = worker
    run = services.run_create(
        user=cast.alice,
        project=cast.acme_project,
        name="celery tiny-llama",
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
        method="lora",
        method_config={"r": 4, "alpha": 8},
        train_config={"steps": 6, "batch_size": 2, "max_length": 64, "eval_every": 3},
    )
    run = _wait_until_finished(run, process, log_path)
    assert run.status == RunStatus.SUCCEEDED, f"{run.error}\n{log_path.read_text()[-3000:]}"
    assert run.attempt == 1 and ":" in run.worker
    assert MetricPoint.objects.filter(run=run, key="train_loss").count() == 6

    client.force_login(cast.bob)
    response = client.get(reverse("run_adapter_download", args=[run.id]))
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    assert sorted(archive.namelist()) == [
        "README.md",  # the model card
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    tensors = safetensors.torch.load(archive.read("adapter_model.safetensors"))
    assert any(key.endswith("lora_A.weight") for key in tensors)


def test_the_worker_takes_runs_in_the_fair_order_not_the_messages_order(cast, worker):
    """Acme's three runs were sent before Umbrella's one; the worker's second run is
    Umbrella's: each message is a turn of its queue, spent on the fair choice."""
    process, log_path = worker
    launch = {
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"],
        "method": "lora",
        "method_config": {"r": 2},
        "train_config": {"steps": 2, "batch_size": 2, "max_length": 32, "eval_every": 0},
    }
    acme = [
        services.run_create(user=cast.alice, project=cast.acme_project, name=f"a{i}", **launch)
        for i in range(3)
    ]
    umbrella = services.run_create(
        user=cast.mallory, project=cast.umbrella_project, name="b", **launch
    )
    for run in [*acme, umbrella]:
        _wait_until_finished(run, process, log_path)
    started = Run.objects.order_by("started_at").values_list("name", flat=True)
    assert list(started) == ["a0", "b", "a1", "a2"], log_path.read_text()[-3000:]
