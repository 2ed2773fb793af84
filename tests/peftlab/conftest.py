"""The client and the CLI against the real Django app, in process: httpx's WSGI transport
carries each request to webapp.wsgi, so every call goes through URLs, auth, views and the
database exactly as over the network."""

from typing import NamedTuple

import httpx
import pytest

from peftlab import cli
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
