"""The model registry from the Python client and the CLI, against the real API in process."""

import pytest

from peftlab.client import DownloadError
from webapp.experiments.models import Artifact

pytestmark = pytest.mark.django_db(transaction=True)

WEIGHTS = bytes(range(256)) * 20


def test_client_registers_aliases_and_downloads_by_alias(client, adapter_run, tmp_path):
    first, second = adapter_run(name="a", weights=WEIGHTS), adapter_run(name="b")
    assert client.register(first.id, "support-bot")["ref"] == "support-bot@v1"  # name created
    assert client.register(second.id, "support-bot")["ref"] == "support-bot@v2"
    assert client.registry_alias("support-bot", 1, "production")["version"] == 1
    [row] = client.registry()
    assert (row["name"], row["versions"], row["aliases"][0]["name"]) == (
        "support-bot",
        2,
        "production",
    )

    paths = client.registry_download("support-bot@production", tmp_path / "prod")
    assert sorted(p.name for p in paths) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "prod" / "adapter_model.safetensors").read_bytes() == WEIGHTS
    latest = client.registry_download("support-bot@v2", tmp_path / "v2")
    assert {p.name: p.read_bytes() for p in latest}["adapter_model.safetensors"] == b"w" * 300


def test_a_damaged_registered_adapter_writes_nothing(client, adapter_run, tmp_path):
    run = adapter_run()
    client.register(run.id, "support-bot")
    Artifact.objects.filter(run=run, name="adapter_model.safetensors").update(sha256="0" * 64)
    with pytest.raises(DownloadError, match="damaged"):
        client.registry_download("support-bot@v1", tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name != "adapter_config.json"] == []


def test_cli_register_alias_list_download(peftlab, adapter_run, tmp_path):
    run = adapter_run(weights=WEIGHTS)
    assert peftlab("registry", "register", run.id, "support-bot").out == (
        f"run {run.id} registered as support-bot@v1\n"
    )
    assert peftlab("registry", "alias", "support-bot", "v1", "production").out == (
        "support-bot@production → v1\n"
    )
    listing = peftlab("registry", "list").out.splitlines()
    assert listing[0].split() == ["NAME", "TEAM", "VERSIONS", "ALIASES"]
    assert listing[1].split() == ["support-bot", "Acme", "1", "production=v1"]

    out = tmp_path / "adapter"
    result = peftlab("registry", "download", "support-bot@production", "-o", out)
    assert result.code == 0 and "wrote" in result.out
    assert (out / "adapter_model.safetensors").read_bytes() == WEIGHTS

    missing = peftlab("registry", "download", "support-bot@staging", "-o", out)
    assert missing.code == 1 and "support-bot has no alias staging" in missing.err
    assert peftlab("registry", "download", "support-bot", "-o", out).code == 2  # no @
    assert peftlab("registry", "alias", "support-bot", "latest", "x").code == 2
