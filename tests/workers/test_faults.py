"""Fault injection on real processes: a Celery worker and the reaper as subprocesses, on the
configured database and broker (PostgreSQL and Redis in CI).

- `kill -9` of the worker mid-run, on the S3 store: the run is lost within 60 s, a restarted
  worker resumes it from its checkpoint (read back from S3, verified), and it ends succeeded
  with one adapter and no duplicate points; no checkpoint byte was ever in PostgreSQL.
- The same task message delivered twice trains once.
- Redis (a server of this test's own) restarted mid-run: the training finishes.
- PostgreSQL unreachable for 30 s mid-run (a TCP proxy between it and the worker and reaper
  is cut): metrics are buffered and written afterwards, none lost or duplicated, and the
  reaper does not take the run away from its living worker.

The figures they print are the ones docs/RELIABILITY.md quotes.
"""

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.test import Client
from django.urls import reverse

from tests.webapp.test_store_s3 import BUCKET, s3  # noqa: F401 (a fixture)
from tests.workers.test_celery_worker import database_env
from webapp.celery import app as celery_app
from webapp.experiments import exports, queue
from webapp.experiments.models import (
    Artifact,
    ArtifactChunk,
    ArtifactHome,
    MetricPoint,
    Run,
    RunStatus,
)
from workers.exports import build_merged_export
from workers.tasks import train_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

TIMEOUT_S = 300
RUN_QUEUE = queue.run_queue("any", 1)  # where a 1-device run of any class goes
# A short lease, so a lost run shows quickly; the reaper must still wait a whole lease after
# any database outage before judging.
FAST_LEASES = {
    "PEFTLAB_RUN_HEARTBEAT_EVERY_S": "1",
    "PEFTLAB_RUN_LEASE_S": "5",
    "PEFTLAB_RUN_REAPER_EVERY_S": "1",
    "PEFTLAB_RUN_DB_OUTAGE_S": "300",
}


class Processes:
    """Workers and reapers started by a test; all killed at its end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path, self.started = tmp_path, []

    def start(self, name: str, command: list[str], env: dict) -> subprocess.Popen:
        log = (self.tmp_path / f"{name}.log").open("w")
        process = subprocess.Popen(
            [sys.executable, *command],
            env={**os.environ, **FAST_LEASES, **database_env(), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=settings.BASE_DIR,
            start_new_session=True,  # its own process group: kill -9 takes the pool children too
        )
        process.log_path = log.name
        self.started.append(process)
        return process

    def worker(self, name: str = "worker", **env) -> subprocess.Popen:
        command = ["-m", "celery", "-A", "webapp", "worker", "-Q", RUN_QUEUE, "--concurrency", "1"]
        command += ["--prefetch-multiplier", "1", "--without-gossip", "--without-mingle"]
        command += ["-n", f"{name}@%h", "-l", "info"]
        return self.start(name, command, env)

    def reaper(self, **env) -> subprocess.Popen:
        return self.start("reaper", ["manage.py", "reaper"], env)

    def logs(self) -> str:
        return "\n".join(
            f"--- {Path(p.log_path).name}\n{Path(p.log_path).read_text()[-2500:]}"
            for p in self.started
        )

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


@pytest.fixture
def empty_queue():
    with celery_app.connection_for_write() as conn:
        conn.default_channel.queue_declare(RUN_QUEUE, durable=True, auto_delete=False)
        conn.default_channel.queue_purge(RUN_QUEUE)


def _queued_run(cast, *, steps: int, checkpoint_every: int = 0, name: str = "fault") -> Run:
    train_config = {"steps": steps, "batch_size": 2, "max_length": 32, "eval_every": 0}
    if checkpoint_every:
        train_config["checkpoint_every"] = checkpoint_every
    return Run.objects.create(
        project=cast.acme_project,
        name=name,
        created_by=cast.alice,
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
        method="lora",
        method_config={"r": 4, "alpha": 8, "dropout": 0.1},
        train_config=train_config,
        total_steps=steps,
    )


def _merged_export_through_the_store(run: Run, cast, client, prefix: str) -> None:
    """Export the finished run merged (the worker's task function, here) and download it:
    its shards are S3 objects, no chunk rows, and the zip holds every stored file whole."""
    export = exports.merged_export_request(run=run)
    assert build_merged_export(export.id) == "ready"
    merged = Artifact.objects.filter(run=run, kind="merged")
    assert set(merged.values_list("home", flat=True)) == {ArtifactHome.STORE}
    assert not ArtifactChunk.objects.filter(artifact__run=run, artifact__kind="merged")
    in_s3 = {key.removeprefix(prefix + "/") for key in _s3_keys(client, prefix)}
    assert set(merged.values_list("key", flat=True)) <= in_s3
    browser = Client()
    browser.force_login(cast.alice)
    response = browser.get(reverse("run_merged_download", args=[run.id]))
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    sizes = {info.filename: info.file_size for info in archive.infolist()}
    assert sizes == dict(merged.values_list("name", "size"))
    assert "config.json" in sizes and any(name.endswith(".safetensors") for name in sizes)


def _s3_keys(client, prefix: str) -> list[str]:
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    return [item["Key"] for item in listing.get("Contents", ())]


def _wait_for(predicate, what: str, processes: Processes, timeout: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n{processes.logs()}")


def _status(run: Run) -> Run:
    run.refresh_from_db()
    return run


def _assert_complete_once(run: Run, steps: int) -> None:
    """Succeeded, one adapter, no checkpoint left, and every step's loss exactly once."""
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert sorted(Artifact.objects.filter(run=run).values_list("kind", "name")) == [
        ("adapter", "adapter_config.json"),
        ("adapter", "adapter_model.safetensors"),
    ]
    losses = list(
        MetricPoint.objects.filter(run=run, key="train_loss")
        .order_by("step")
        .values_list("step", flat=True)
    )
    assert losses == list(range(1, steps + 1))


def test_kill_9_mid_run_loses_the_run_and_a_restarted_worker_resumes_it(
    cast,
    processes,
    empty_queue,
    s3,  # noqa: F811 (the imported fixture)
):
    """On the S3 store (CI's S3 server): the checkpoints go there, none into PostgreSQL;
    the finished run's merged export goes there too and downloads whole."""
    client, prefix = s3
    store_env = {"PEFTLAB_ARTIFACT_STORE": f"s3://{BUCKET}/{prefix}"}
    steps = 300
    run = _queued_run(cast, steps=steps, checkpoint_every=20)
    worker = processes.worker(**store_env)
    processes.reaper(**store_env)
    train_run.delay(run.id)
    _wait_for(
        lambda: _status(run).step >= 50 and Artifact.objects.filter(run=run, kind="checkpoint"),
        "a checkpoint at step 40 or later",
        processes,
    )
    checkpoints = Artifact.objects.filter(run=run, kind="checkpoint")
    assert set(checkpoints.values_list("home", flat=True)) == {ArtifactHome.STORE}
    assert not ArtifactChunk.objects.filter(artifact__run=run, artifact__kind="checkpoint")
    in_s3 = {key.removeprefix(prefix + "/") for key in _s3_keys(client, prefix)}
    assert set(checkpoints.values_list("key", flat=True)) <= in_s3
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    killed_at, killed_step = time.monotonic(), _status(run).step

    _wait_for(lambda: _status(run).status == RunStatus.LOST, "the run to be lost", processes, 60)
    lost_after_s = time.monotonic() - killed_at
    assert lost_after_s <= 60

    restarted = processes.worker(name="restarted", **store_env)
    _wait_for(lambda: _status(run).is_finished, "the resumed run to finish", processes)
    _assert_complete_once(run, steps)
    # The run's checkpoints go once its end is committed (the worker deletes them just after).
    _wait_for(
        lambda: not [key for key in _s3_keys(client, prefix) if "/checkpoint/" in key],
        "the ended run's checkpoints to leave the store",
        processes,
        timeout=30,
    )
    assert run.attempt == 2, processes.logs()
    _merged_export_through_the_store(run, cast, client, prefix)
    resumed = re.findall(r"resumed from step (\d+)", Path(restarted.log_path).read_text())
    assert len(resumed) == 1, processes.logs()
    resumed_step = int(resumed[0])
    assert 40 <= resumed_step <= killed_step and resumed_step % 20 == 0
    print(
        f"\nkill -9 at step {killed_step}: lost after {lost_after_s:.1f} s, "
        f"resumed from step {resumed_step}, {steps - resumed_step} steps trained again"
    )


def test_the_same_message_delivered_twice_trains_once(cast, processes, empty_queue):
    run = _queued_run(cast, steps=4)
    train_run.apply_async((run.id,), task_id="same-message")
    train_run.apply_async((run.id,), task_id="same-message")
    processes.worker()
    _wait_for(lambda: _status(run).is_finished, "the run to finish", processes)
    _assert_complete_once(run, 4)
    assert run.attempt == 1 and run.fence == 1
    log = Path(processes.started[0].log_path)
    _wait_for(lambda: "not waiting for a worker" in log.read_text(), "the skip", processes, 60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _redis_server(port: int):
    binary = shutil.which("redis-server")
    if binary is None:
        if settings.REQUIRE_SERVICES:
            pytest.fail("redis-server is required in CI")
        pytest.skip("redis-server is not installed")

    def start():
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return process
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    holder = {"process": start()}

    def restart(down_s: float) -> None:
        holder["process"].kill()
        holder["process"].wait()
        time.sleep(down_s)
        holder["process"] = start()

    try:
        yield restart
    finally:
        holder["process"].kill()
        holder["process"].wait()


def test_a_redis_restart_mid_run_does_not_stop_the_training(cast, processes):
    port = _free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    with _redis_server(port) as restart_redis:
        steps = 200
        run = _queued_run(cast, steps=steps)
        processes.worker(CELERY_BROKER_URL=broker)
        with celery_app.connection_for_write(broker) as conn:
            train_run.apply_async((run.id,), connection=conn)
        _wait_for(lambda: _status(run).step >= 20, "training to start", processes)
        restart_redis(down_s=3)
        step_at_restart = run.step
        _wait_for(lambda: _status(run).is_finished, "the run to finish", processes)
        _assert_complete_once(run, steps)
        assert run.attempt == 1 and step_at_restart < steps

        # the worker is connected to the new Redis: a run sent there now is trained too
        after = _queued_run(cast, steps=3, name="after the restart")
        with celery_app.connection_for_write(broker) as conn:
            train_run.apply_async((after.id,), connection=conn)
        _wait_for(lambda: _status(after).is_finished, "a run sent after the restart", processes)
        assert after.status == RunStatus.SUCCEEDED, after.error


class _CuttableProxy:
    """A TCP proxy to PostgreSQL that can be cut: every connection through it is dropped and
    new ones are closed at once, as when the database host goes away."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def go_down(self) -> None:
        self.cut.set()
        with self.lock:
            for sock in self.open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.open = []

    def come_back(self) -> None:
        self.cut.clear()

    def close(self) -> None:
        self.go_down()
        self.listener.close()


def test_postgresql_away_for_30_s_mid_run_loses_no_metric(cast, processes, empty_queue):
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        pytest.skip("a database outage needs a database server (CI runs this on PostgreSQL)")
    proxy = _CuttableProxy((db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)))
    try:
        through_proxy = database_env("127.0.0.1", proxy.port)
        steps = 300
        run = _queued_run(cast, steps=steps, checkpoint_every=50)
        processes.worker(**through_proxy)
        processes.reaper(**through_proxy)
        train_run.delay(run.id)
        _wait_for(lambda: _status(run).step >= 30, "training to start", processes)
        proxy.go_down()
        down_at_step = _status(run).step
        time.sleep(30)
        proxy.come_back()
        _wait_for(lambda: _status(run).is_finished, "the run to finish", processes)
    finally:
        proxy.close()
    _assert_complete_once(run, steps)
    assert run.attempt == 1, f"the reaper took the run from its worker\n{processes.logs()}"
    assert any(line.startswith("database back after") for line in run.log_lines()), run.log
    print(f"\nPostgreSQL away 30 s from step {down_at_step}: {steps} of {steps} losses stored")
