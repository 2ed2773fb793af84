"""The 200,000-key flood of issue 17 against a real server (gunicorn as bin/serve starts it,
on the test database): a member sends 200 batches of 1,000 new keys to one run while others
ask for "all keys" and a monitor asks for /health/. Before the cap the run took every key,
and one all-keys query then read 200,000 series. Now the first batch fills the cap (1,000),
the other 199 are refused whole, each all-keys query answers one page, and /health/ answers
throughout."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from django.conf import settings

from tests.workers.test_celery_worker import database_env
from webapp.accounts.services import api_token_create
from webapp.experiments.metrics import metric_keys_stored
from webapp.experiments.models import RunStatus

pytestmark = pytest.mark.django_db(transaction=True)

FLOOD_BATCHES, KEYS_PER_BATCH = 200, 1000
HEALTH_WAIT_S = 5.0  # each /health/ is given this long (test_nginx gives 3 s)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """gunicorn with bin/serve's workers and threads, on this test's database."""
    port = _free_port()
    env = os.environ | database_env() | {"PEFTLAB_VAR_DIR": str(tmp_path / "var")}
    command = [sys.executable, "-m", "gunicorn", "webapp.wsgi", "--bind", f"127.0.0.1:{port}"]
    command += ["--workers", "2", "--threads", "4", "--timeout", "120", "--preload"]
    log = (tmp_path / "gunicorn.log").open("wb")
    process = subprocess.Popen(
        command, cwd=settings.BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "gunicorn.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gunicorn did not answer /health/"
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _batches(run_id: int):
    for b in range(FLOOD_BATCHES):
        keys = (f"flood/{b:03d}/{k:03d}" for k in range(KEYS_PER_BATCH))
        points = [{"key": key, "step": 1, "value": 1.0} for key in keys]
        yield json.dumps({"points": points}).encode()


def test_the_key_flood_stops_at_the_cap_and_health_answers_throughout(cast, make_run, server):
    assert settings.METRIC_KEYS_PER_RUN == 1000 and settings.METRIC_KEYS_PER_PAGE == 50
    run = make_run(external=True, status=RunStatus.RUNNING)
    headers = {"Authorization": f"Bearer {api_token_create(user=cast.bob, name='t')[1]}"}
    metrics_url = f"{server}/api/v1/runs/{run.id}/metrics/"
    bodies, lock = iter(list(_batches(run.id))), threading.Lock()
    ingested, pages, health = [], [], []
    flooding = threading.Event()
    flooding.set()

    def flood() -> None:
        with httpx.Client(headers=headers | {"Content-Type": "application/json"}) as client:
            while True:
                with lock:
                    body = next(bodies, None)
                if body is None:
                    return
                answer = client.post(metrics_url, content=body, timeout=60)
                ingested.append((answer.status_code, answer.json()))

    def read_all_keys() -> None:
        with httpx.Client(headers=headers) as client:
            while flooding.is_set():
                answer = client.get(metrics_url, timeout=60)
                pages.append((answer.status_code, answer.json()))
                time.sleep(0.1)  # paced: 4 readers ask ~30 times a second

    def monitor() -> None:
        with httpx.Client() as client:
            while flooding.is_set():
                started = time.monotonic()
                try:
                    status = client.get(f"{server}/health/", timeout=HEALTH_WAIT_S).status_code
                except httpx.TimeoutException:
                    status = "timed out"
                health.append((status, time.monotonic() - started))
                time.sleep(0.05)

    writers = [threading.Thread(target=flood) for _ in range(4)]
    others = [threading.Thread(target=read_all_keys) for _ in range(4)]
    others.append(threading.Thread(target=monitor))
    for thread in writers + others:
        thread.start()
    for thread in writers:
        thread.join()
    flooding.clear()
    for thread in others:
        thread.join()

    codes = [code for code, _ in ingested]
    assert len(codes) == FLOOD_BATCHES and codes.count(200) == 1 and codes.count(400) == 199
    refusals = {body["detail"].split(";")[0] for code, body in ingested if code == 400}
    assert refusals == {
        "A run takes at most 1,000 distinct metric keys (PEFTLAB_MAX_METRIC_KEYS_PER_RUN)"
    }
    assert len(metric_keys_stored(run_id=run.id, limit=10**6)) == 1000
    # Every all-keys query answered one page of at most 50 keys, with a cursor once more
    # were stored.
    assert pages and all(code == 200 and len(body["series"]) <= 50 for code, body in pages)
    assert all(body["next_cursor"] for _, body in pages if len(body["series"]) == 50)
    # /health/ answered every time, each within its wait, while the flood ran.
    assert len(health) >= 5 and all(status == 200 for status, _ in health), health
    print(
        f"\n{len(codes)} batches, {len(pages)} all-keys pages; /health/ x{len(health)}, "
        f"slowest {max(s for _, s in health) * 1000:.0f} ms"
    )
