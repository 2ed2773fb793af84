"""The client and the CLI against the real Django app, in process: httpx's WSGI transport
carries each request to webapp.wsgi, so every call goes through URLs, auth, views and the
database exactly as over the network."""

import threading
from typing import NamedTuple

import httpx
import pytest

from peftlab import cli, tracking
from peftlab.client import Client

SERVER = "http://testserver"  # the host Django's test environment allows


class Result(NamedTuple):
    code: int
    out: str
    err: str


class FlakyTransport(httpx.BaseTransport):
    """Refuses the first `failures` requests, as a restarting server does, then passes them on."""

    def __init__(self, inner: httpx.BaseTransport, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.failures:
            self.failures -= 1
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return self.inner.handle_request(request)


@pytest.fixture
def transport() -> httpx.WSGITransport:
    from django.core.wsgi import get_wsgi_application

    return httpx.WSGITransport(app=get_wsgi_application())


@pytest.fixture
def server_url() -> str:
    return SERVER


@pytest.fixture
def flaky_client(transport, alice_token):
    """`flaky_client(n)`: alice's client on a server that refuses its first n requests."""
    clients = []

    def make(failures: int) -> Client:
        clients.append(Client(SERVER, alice_token, transport=FlakyTransport(transport, failures)))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def alice_token(cast) -> str:
    from webapp.accounts.services import api_token_create

    return api_token_create(user=cast.alice, name="t")[1]


@pytest.fixture
def client(transport, alice_token):
    with Client(SERVER, alice_token, transport=transport) as client:
        yield client


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    """Where credentials are saved in this test; the environment holds none."""
    path = tmp_path / "config" / "peftlab.json"
    monkeypatch.setenv("PEFTLAB_CONFIG", str(path))
    monkeypatch.delenv("PEFTLAB_URL", raising=False)
    monkeypatch.delenv("PEFTLAB_TOKEN", raising=False)
    return path


@pytest.fixture
def offline_cli(monkeypatch, transport, config_file, capsys):
    """Runs `peftlab ARGS…` against the in-process app with whatever credentials the test
    sets up; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(cli, "client_options", {"transport": transport})

    def run(*args: object) -> Result:
        capsys.readouterr()  # only this command's output
        code = cli.main([str(arg) for arg in args])
        return Result(code, *capsys.readouterr())

    return run


@pytest.fixture
def peftlab(offline_cli, monkeypatch, alice_token):
    """`peftlab ARGS…` as alice (PEFTLAB_URL / PEFTLAB_TOKEN set)."""
    monkeypatch.setenv("PEFTLAB_URL", SERVER)
    monkeypatch.setenv("PEFTLAB_TOKEN", alice_token)
    return offline_cli


@pytest.fixture
def sample_id(cast) -> int:
    return cast.datasets["sample-instructions"].id


@pytest.fixture
def queued_run(client, sample_id) -> dict:
    return client.launch_run(
        base_model="tiny-llama",
        dataset=sample_id,
        method="lora",
        method_config={"r": 4},
        train_config={"steps": 10},
        name="queued",
    )


class Switch(httpx.BaseTransport):
    """The in-process app, or a refused connection while `down`; records each request."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.down = False
        self.requests: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        self.requests.append((request.method, request.url.path))
        try:
            return self.inner.handle_request(request)
        finally:
            if threading.current_thread() is not threading.main_thread():
                from django.db import connections

                connections.close_all()  # the sender's own connection, or teardown waits on it

    def posts(self, suffix: str) -> int:
        return sum(method == "POST" and path.endswith(suffix) for method, path in self.requests)


@pytest.fixture
def switch(transport, alice_token, monkeypatch, tmp_path):
    """peftlab.init as alice on the in-process server (PEFTLAB_URL / PEFTLAB_TOKEN set), with
    a spool of its own and backoffs of milliseconds; `switch.down = True` stops the server."""
    switch = Switch(transport)
    monkeypatch.setattr(tracking, "client_options", {"transport": switch})
    monkeypatch.setattr(tracking, "SEND_DELAYS", (0.01, 0.01))
    monkeypatch.setattr(tracking, "DRAIN_DELAYS", (0.05,))
    monkeypatch.setattr(tracking.Run, "finish_wait_s", 0.3)
    monkeypatch.setenv("PEFTLAB_URL", SERVER)
    monkeypatch.setenv("PEFTLAB_TOKEN", alice_token)
    monkeypatch.setenv("PEFTLAB_SPOOL_DIR", str(tmp_path / "spool"))
    yield switch
    switch.down = False
    for run in list(tracking._open_runs.values()):  # a failed test's run, before the db goes
        run.finish("failed")
