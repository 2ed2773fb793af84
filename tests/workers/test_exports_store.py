"""Merged exports in the artifact store: built by the worker's task function in the base's
own dtype (bf16 stays bf16, the adapter added in float32 and rounded once), written in
safetensors shards that stream into the store (no chunk rows), versioned (a rebuild adds a
version beside the old one), and downloaded as a zip hashed while it streams, so a damaged
shard cuts the transfer. File store and the S3 server alike."""

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from django.conf import settings
from django.db.models import F
from django.template.defaultfilters import filesizeformat
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient
from safetensors import safe_open
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import peft_core
import workers.exports
from peft_core.catalogue import load_model
from peft_core.pretrained import load_directory
from tests.peft_core.test_lora import perturb
from tests.webapp.test_exports import _logits, _trained_run
from tests.webapp.test_store_s3 import BUCKET, s3  # noqa: F401 (a fixture)
from webapp.accounts.services import api_token_create
from webapp.experiments import artifacts, exports, leases, pages, services, store
from webapp.experiments.models import (
    Artifact,
    ArtifactChunk,
    ArtifactHome,
    ArtifactKind,
    ExportStatus,
    MergedExport,
    Run,
    RunStatus,
    Sweep,
)
from webapp.registry import services as registry
from workers.exports import build_merged_export
from workers.inspection import inspect_registered_model

pytestmark = pytest.mark.django_db

SHARD_BYTES = 100_000  # tiny-llama's ~0.6 MB of float32 weights: several shards


@pytest.fixture(params=["file", "s3"])
def artifact_store(request, settings, tmp_path):
    """The store the export goes to; yields a function that overwrites a stored key's bytes
    behind the store's back (as a failing disk or a tampered bucket would)."""
    if request.param == "s3":
        client, prefix = request.getfixturevalue("s3")
        return lambda key, data: client.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=data)
    backend = {"BACKEND": "webapp.experiments.store.WriteOnceFileStorage"}
    location = tmp_path / "artifacts"
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {**backend, "OPTIONS": {"location": str(location)}},
    }
    return lambda key, data: (location / key).write_bytes(data)


@pytest.fixture
def lora_run(cast, make_run, tmp_path):
    return _trained_run(
        make_run,
        tmp_path / "adapter",
        base_model="tiny-llama",
        task="causal-lm",
        method="lora",
        config=peft_core.LoraConfig(r=4, alpha=8),
        dataset=cast.datasets["sample-instructions"],
        method_config={"r": 4, "alpha": 8},
    )


def _build(run) -> MergedExport:
    """Ask for the export as the page does and run the `export` queue's task function."""
    export = exports.merged_export_request(run=run)
    assert export.status == ExportStatus.QUEUED
    assert build_merged_export(export.id) == "ready"
    export.refresh_from_db()
    return export


def _download(client, run) -> bytes:
    response = client.get(reverse("run_merged_download", args=[run.id]))
    assert response.status_code == 200, response.content[:300]
    return b"".join(response.streaming_content)


def _unzip(data: bytes, directory: Path) -> Path:
    zipfile.ZipFile(io.BytesIO(data)).extractall(directory)
    return directory


def test_a_sharded_export_streams_into_the_store_and_loads_in_transformers(
    cast, lora_run, artifact_store, settings, monkeypatch, tmp_path
):
    run, expected = lora_run
    settings.MERGED_SHARD_SIZE = SHARD_BYTES
    sources = []
    real_write = store.store_write

    def spy(key, source):
        sources.append(source)
        return real_write(key, source)

    monkeypatch.setattr(workers.exports, "store_write", spy)
    export = _build(run)
    merged = list(Artifact.objects.filter(run=run, kind=ArtifactKind.MERGED))
    names = {a.name for a in merged}
    shards = sorted(n for n in names if n.startswith("model-") and n.endswith(".safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"model.safetensors.index.json", "config.json", "tokenizer.json", "README.md"} <= names
    assert "model.safetensors" not in names
    assert {(a.home, a.version) for a in merged} == {(ArtifactHome.STORE, 1)}
    assert not ArtifactChunk.objects.filter(artifact__in=merged).exists()
    assert all(a.key.startswith(f"runs/{run.id}/merged/") for a in merged)
    # each file went up from an open file handle, never as bytes read whole
    assert len(sources) == len(merged) and not any(isinstance(s, bytes) for s in sources)
    assert export.size == sum(a.size for a in merged)

    client = Client()
    client.force_login(cast.bob)
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert f"Download merged model (.zip, {filesizeformat(export.size)})" in page
    directory = _unzip(_download(client, run), tmp_path / "merged")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    assert_close(_logits(model), expected, atol=1e-5, rtol=1e-4)


def test_a_damaged_shard_in_the_store_cuts_the_download(
    cast, lora_run, artifact_store, settings, monkeypatch
):
    run, _ = lora_run
    settings.MERGED_SHARD_SIZE = SHARD_BYTES
    _build(run)
    shard = Artifact.objects.filter(run=run, kind=ArtifactKind.MERGED, name__startswith="model-")
    victim = shard.order_by("name").last()
    data = bytearray(store.store_read(victim.key, size=victim.size, sha256=victim.sha256))
    data[len(data) // 2] ^= 1
    artifact_store(victim.key, bytes(data))  # same size: only the hash can tell

    client = Client()
    client.force_login(cast.bob)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {api_token_create(user=cast.bob, name='t')[1]}")
    page_url = reverse("run_merged_download", args=[run.id])
    api_url = reverse("api-run-merged", args=[run.id])
    # A tiny model is checked whole before the zip starts: a 409 naming the shard.
    response = client.get(page_url)
    assert response.status_code == 409 and victim.name.encode() in response.content
    assert api.get(api_url).status_code == 409
    # A model past the whole-check size streams, and the damaged member cuts it.
    monkeypatch.setattr(pages, "VERIFY_FIRST_BYTES", 1000)
    response = client.get(page_url)
    assert response.status_code == 200  # the headers left before the damaged member
    with pytest.raises(artifacts.ArtifactDamaged):
        b"".join(response.streaming_content)
    response = api.get(api_url)
    with pytest.raises(artifacts.ArtifactDamaged):
        b"".join(response.streaming_content)


def _another_adapter(directory: Path) -> tuple[dict[str, bytes], torch.Tensor]:
    """tiny-llama's LoRA adapter with other values: its files and the adapted logits."""
    model, _ = load_model("tiny-llama", "causal-lm", cache_dir=settings.MODEL_CACHE_DIR)
    model = peft_core.apply(model, peft_core.LoraConfig(r=4, alpha=8))
    perturb(model, seed=11)
    peft_core.save_adapter(model, directory, base_model_name_or_path="tiny-llama")
    return {path.name: path.read_bytes() for path in directory.iterdir()}, _logits(model)


def test_an_adapters_new_version_rebuilds_as_version_2_and_keeps_version_1(
    cast, lora_run, artifact_store, tmp_path
):
    run, _ = lora_run
    first = _build(run)
    version_1 = {a.name: (a.key, a.sha256) for a in exports.merged_files(run)}
    client = Client()
    client.force_login(cast.alice)
    assert _download(client, run)  # ready and current: served, not built again
    assert MergedExport.objects.filter(
        run=run, status=ExportStatus.READY, attempt=first.attempt
    ).exists()

    files, expected = _another_adapter(tmp_path / "v2")
    for name, data in files.items():  # as a resumed run's final adapter is stored
        artifacts.artifact_insert(
            run_id=run.id, kind=ArtifactKind.ADAPTER, name=name, data=data, version=2
        )
    response = client.get(reverse("run_merged_download", args=[run.id]))
    assert response.status_code == 302  # a merge of the old adapter is not served as current
    export = MergedExport.objects.get(run=run)
    assert export.status == ExportStatus.QUEUED
    assert build_merged_export(export.id) == "ready"
    merged = Artifact.objects.filter(run=run, kind=ArtifactKind.MERGED)
    assert sorted(set(merged.values_list("version", flat=True))) == [1, 2]
    kept = exports.merged_files(run, version=1)
    assert {a.name: (a.key, a.sha256) for a in kept} == version_1
    for artifact in kept:  # version 1's files are still whole in the store
        store.store_read(artifact.key, size=artifact.size, sha256=artifact.sha256)
    export.refresh_from_db()
    newest = list(exports.merged_files(run))
    assert {a.version for a in newest} == {2} and export.size == sum(a.size for a in newest)
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert f"Download merged model (.zip, {filesizeformat(export.size)} · version 2)" in page
    model = AutoModelForCausalLM.from_pretrained(
        _unzip(_download(client, run), tmp_path / "merged-v2"), local_files_only=True
    )
    assert_close(_logits(model), expected, atol=1e-5, rtol=1e-4)


def test_a_superseded_build_leaves_no_files_in_the_store(lora_run, artifact_store, monkeypatch):
    run, _ = lora_run
    real_upload = workers.exports._upload
    uploaded = []

    def upload_then_lose_the_build(run_id, directory):
        stored = real_upload(run_id, directory)
        uploaded.extend(file.key for file in stored.values())
        # meanwhile a request found the build stuck and sent it to another worker
        MergedExport.objects.filter(run_id=run_id).update(attempt=F("attempt") + 1)
        return stored

    monkeypatch.setattr(workers.exports, "_upload", upload_then_lose_the_build)
    export = exports.merged_export_request(run=run)
    assert build_merged_export(export.id) == "superseded"
    assert uploaded and not any(store.artifact_storage().exists(key) for key in uploaded)
    assert not Artifact.objects.filter(run=run, kind=ArtifactKind.MERGED).exists()


def test_a_failed_record_deletes_the_uploaded_files(lora_run, artifact_store, monkeypatch):
    run, _ = lora_run
    export = exports.merged_export_request(run=run)
    attempt = exports.merged_export_claim(export_id=export.id)
    files = {"a.json": b"{}", "b.safetensors": b"x" * 10}
    stored = {
        name: store.store_write(store.store_key(run_id=run.id, kind="merged", name=name), data)
        for name, data in files.items()
    }

    def refuse(export, stored):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(exports, "_merged_record", refuse)
    with pytest.raises(RuntimeError):
        exports.merged_export_store(export_id=export.id, attempt=attempt, stored=stored)
    assert not any(store.artifact_storage().exists(file.key) for file in stored.values())


def _orphan(run) -> str:
    """A shard a worker uploaded and was killed before recording: no row names it."""
    key = store.store_key(run_id=run.id, kind=ArtifactKind.MERGED, name="model.safetensors")
    return store.store_write(key, b"half an export").key


def test_the_next_build_deletes_what_a_killed_worker_left_in_the_store(lora_run, artifact_store):
    run, _ = lora_run
    orphan = _orphan(run)
    _build(run)
    assert not store.artifact_storage().exists(orphan)
    for artifact in exports.merged_files(run):
        store.store_read(artifact.key, size=artifact.size, sha256=artifact.sha256)


@pytest.mark.parametrize("how", ["run", "sweep"])
def test_deleting_the_run_deletes_its_merged_files_from_the_store(
    cast, lora_run, artifact_store, how, django_capture_on_commit_callbacks
):
    """The rows go, and on commit every file under the run's store folders, also one that no
    row ever named."""
    run, _ = lora_run
    _build(run)
    keys = list(Artifact.objects.filter(run=run).exclude(key="").values_list("key", flat=True))
    keys.append(_orphan(run))
    assert all(store.artifact_storage().exists(key) for key in keys)
    with django_capture_on_commit_callbacks(execute=True):
        if how == "run":
            services.run_delete(user=cast.alice, run=run)
        else:
            sweep = Sweep.objects.create(
                project=run.project, name="s", base_model=run.base_model, dataset=run.dataset
            )
            Run.objects.filter(id=run.id).update(sweep=sweep)
            services.sweep_delete(user=cast.alice, sweep=sweep)
    assert not Run.objects.filter(id=run.id).exists()
    assert not any(store.artifact_storage().exists(key) for key in keys)


# ---- a bf16 base ---------------------------------------------------------------------------


@pytest.fixture
def bf16_model(cast, settings, model_root, tmp_path):
    """my-qwen saved again in bfloat16 under an allowed root and registered by Acme."""
    root = tmp_path / "models"
    model, tokenizer = load_directory(model_root / "my-qwen", "causal-lm")
    model.to(torch.bfloat16).save_pretrained(root / "qwen-bf16", safe_serialization=True)
    tokenizer.save_pretrained(root / "qwen-bf16")
    settings.MODEL_ROOTS = [root]
    registered = registry.model_register(
        user=cast.alice, team=cast.acme, name="qwen-bf16", path="qwen-bf16"
    )
    assert inspect_registered_model(registered.id) == "ready"
    registered.refresh_from_db()
    assert registered.facts["dtype"] == "bfloat16"
    return registered


def test_a_bf16_base_exports_in_bf16_with_the_adapter_added_once(
    cast, bf16_model, artifact_store, tmp_path
):
    weights = bf16_model.weights()
    base, _ = load_directory(Path(weights["location"]), "causal-lm")
    assert base.dtype == torch.bfloat16
    model = peft_core.apply(base, peft_core.LoraConfig(r=4, alpha=8))
    perturb(model, seed=5)
    peft_core.save_adapter(model, tmp_path / "adapter", base_model_name_or_path="qwen-bf16")
    run = Run.objects.create(
        project=cast.acme_project, name="bf16", created_by=cast.alice, base_model="qwen-bf16",
        base_weights=weights, dataset=cast.datasets["sample-instructions"], method="lora",
        method_config={"r": 4, "alpha": 8}, train_config={"steps": 1}, total_steps=1,
    )  # fmt: skip
    fence = leases.run_claim(run_id=run.id, worker="test")
    for path in sorted((tmp_path / "adapter").iterdir()):
        leases.artifact_store(
            run_id=run.id, fence=fence, kind="adapter", name=path.name, data=path.read_bytes()
        )
    Run.objects.filter(id=run.id).update(status=RunStatus.SUCCEEDED)
    run.refresh_from_db()
    _build(run)

    client = Client()
    client.force_login(cast.bob)
    directory = _unzip(_download(client, run), tmp_path / "merged")
    config = json.loads((directory / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    exported = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(path, framework="pt") as shards:
            exported |= {key: shards.get_tensor(key) for key in shards.keys()}  # noqa: SIM118
    assert {tensor.dtype for tensor in exported.values()} == {torch.bfloat16}
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "delta_weight")}
    assert layers
    rounded_twice = 0
    for name, layer in layers.items():
        w0, delta = layer.base_layer.weight, layer.delta_weight()  # bf16 W0, float32 ΔW
        assert delta.dtype == torch.float32
        once = (w0.float() + delta).to(torch.bfloat16)
        assert torch.equal(exported[f"{name}.weight"], once), name
        rounded_twice += int((w0 + delta.to(torch.bfloat16) != once).sum())
    assert rounded_twice > 0  # the two ways differ here, so the check above tells them apart
    untouched = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(exported[untouched], base.get_submodule(untouched[:-7]).weight)
    plain = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype="auto")
    assert plain.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("2GB", 2 * 10**9), ("500MiB", 500 * 2**20), ("1048576", 2**20), (" 64 kb ", 64_000)],
)
def test_the_shard_size_setting_reads_sizes(monkeypatch, raw, expected):
    from webapp import settings as module

    monkeypatch.setenv("PEFTLAB_MERGED_SHARD_SIZE", raw)
    assert module.env_bytes("PEFTLAB_MERGED_SHARD_SIZE", "2GB") == expected
    assert settings.MERGED_SHARD_SIZE == 2 * 10**9  # the default here


@pytest.mark.parametrize("raw", ["2 TB", "lots", "-5MB", "1.5GB"])
def test_a_shard_size_that_is_no_size_fails_loudly(monkeypatch, raw):
    from django.core.exceptions import ImproperlyConfigured

    from webapp import settings as module

    monkeypatch.setenv("PEFTLAB_MERGED_SHARD_SIZE", raw)
    with pytest.raises(ImproperlyConfigured, match="is not a size"):
        module.env_bytes("PEFTLAB_MERGED_SHARD_SIZE", "2GB")
