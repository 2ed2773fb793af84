"""Adapter upload: safetensors only, checked in a separate process with size and time limits,
the config rebuilt server-side, base models only from the catalogue; a refused upload answers
400 and stores nothing."""

import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import peft
import psutil
import pytest
import torch
from django.core.exceptions import PermissionDenied
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient
from safetensors.torch import load, save
from torch.testing import assert_close

import peft_core
from peft_core.tiny import build_tiny
from tests.peft_core.test_lora import perturb
from webapp.accounts.services import api_token_create
from webapp.experiments import services
from webapp.experiments.models import Artifact, Dataset, MetricPoint, Run, RunStatus
from workers.training import execute_run

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
INPUT_IDS = torch.tensor([[1, 5, 9, 14, 3, 7]])


def _logits(model):
    with torch.no_grad():
        return model.eval()(INPUT_IDS).logits


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A LoRA on the catalogue's tiny Llama, saved by peft_core: (config bytes, weights, logits)."""
    model = peft_core.apply(build_tiny("llama"), peft_core.LoraConfig(r=4))
    perturb(model, seed=3)
    directory = tmp_path_factory.mktemp("lora")
    peft_core.save_adapter(model, directory, base_model_name_or_path="tiny-llama")
    config = (directory / "adapter_config.json").read_bytes()
    weights = (directory / "adapter_model.safetensors").read_bytes()
    return config, weights, _logits(model)


def _files(config: bytes, weights: bytes, *, config_name="adapter_config.json", weights_name=None):
    return {
        "config": SimpleUploadedFile(config_name, config, "application/json"),
        "weights": SimpleUploadedFile(weights_name or "adapter_model.safetensors", weights),
    }


def _with(config: bytes, **changes) -> bytes:
    return json.dumps(json.loads(config) | changes).encode()


@pytest.fixture
def api(cast):
    """api(user): a DRF client holding a fresh personal token of `user`."""

    def client_for(user) -> APIClient:
        _, plain = api_token_create(user=user, name="t")
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {plain}")
        return client

    return client_for


@pytest.fixture
def upload(cast, api):
    """upload(config, weights, user=bob, **fields) -> the API's response."""

    def post(config: bytes, weights: bytes, *, user=None, weights_name=None, **fields):
        client = api(user or cast.bob)
        body = {"project": cast.acme_project.id, "name": "from elsewhere"} | fields
        body |= _files(config, weights, weights_name=weights_name)
        return client.post(reverse("api-adapter-upload"), body, format="multipart")

    return post


def _assert_refused(response, text: str) -> None:
    assert response.status_code == 400, response.content
    assert text in response.content.decode()
    assert not Run.objects.exists() and not Artifact.objects.exists()


def _unzip(response, directory: Path) -> Path:
    data = b"".join(response.streaming_content)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        assert sorted(Path(n).name for n in names) == [
            "README.md",  # the model card
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        for name in names:
            (directory / Path(name).name).write_bytes(archive.read(name))
    return directory


# ---- accepted ---------------------------------------------------------------------------------


def test_page_upload_becomes_a_finished_run_whose_download_loads_in_peft_core_and_hf_peft(
    cast, lora, tmp_path
):
    config, weights, expected = lora
    client = Client()
    client.force_login(cast.bob)
    page = client.get(reverse("adapter_upload"))
    assert page.status_code == 200 and b"adapter_model.safetensors" in page.content
    assert reverse("adapter_upload").encode() in client.get(reverse("runs")).content
    body = {"project": cast.acme_project.id, "name": "from elsewhere", "base_model": ""}
    response = client.post(reverse("adapter_upload"), body | _files(config, weights))

    run = Run.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse(
        "run_detail", args=[run.id]
    )
    assert run.external and run.status == RunStatus.QUEUED  # for a worker to evaluate
    assert (run.method, run.base_model, run.created_by) == ("lora", "tiny-llama", cast.bob)
    assert run.method_config == {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    assert run.dataset == cast.datasets["sample-instructions"]
    assert set(run.artifacts.values_list("kind", flat=True)) == {"adapter"}
    assert client.get(reverse("run_detail", args=[run.id])).status_code == 200

    # a worker measures it as it measures a trained run, so it compares with them
    assert execute_run(run.id, worker="w1:1") == "succeeded"
    run.refresh_from_db()
    assert (run.status, run.attempt) == (RunStatus.SUCCEEDED, 1)
    assert run.summary["base_eval_loss"] > 0 and run.summary["eval_loss"] > 0
    assert run.summary["eval_loss"] != run.summary["base_eval_loss"]  # the adapter acts
    assert run.profile["trainable_params"] == sum(t.numel() for t in load(weights).values())
    assert run.profile["adapter_ms"] > 0 and "wall_s" not in run.profile
    evals = MetricPoint.objects.filter(run=run).values_list("key", "step")
    assert sorted(evals) == [("base_eval_loss", 0), ("eval_loss", 0)]
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert "uploaded, checked and evaluated here" in page

    download = client.get(reverse("run_adapter_download", args=[run.id]))
    directory = _unzip(download, tmp_path)
    assert (directory / "adapter_config.json").read_bytes() == config
    ours = peft_core.load_adapter(build_tiny("llama"), directory)
    assert_close(_logits(ours), expected)
    theirs = peft.PeftModel.from_pretrained(build_tiny("llama"), directory)
    assert_close(_logits(theirs), expected, atol=1e-4, rtol=0)


def test_api_upload_answers_201_with_the_run_and_its_files_download(cast, api, upload, lora):
    config, weights, _ = lora
    response = upload(config, weights)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["external"] is True and body["status"] == "queued"
    assert (body["method"], body["base_model"]) == ("lora", "tiny-llama")
    artifacts = api(cast.bob).get(f"/api/v1/runs/{body['id']}/artifacts/").json()
    by_name = {a["name"]: a for a in artifacts}
    assert set(by_name) == {"adapter_config.json", "adapter_model.safetensors"}
    file = api(cast.bob).get(
        f"/api/v1/artifacts/{by_name['adapter_model.safetensors']['id']}/download/"
    )
    stored = load(file.content)  # a small file: checked whole, then sent
    assert stored.keys() == load(weights).keys()
    assert all(torch.equal(stored[k], load(weights)[k]) for k in stored)


def test_unknown_and_dangerous_config_keys_are_dropped_from_the_rebuilt_config(cast, upload, lora):
    config, weights, _ = lora
    tainted = _with(
        config,
        trust_remote_code=True,
        auto_mapping={"base_model_class": "Evil", "parent_library": "evil.module"},
        revision="main",
        evil_key="x" * 1000,
    )
    response = upload(tainted, weights)
    assert response.status_code == 201, response.content
    stored = Artifact.objects.get(name="adapter_config.json")
    data = b"".join(bytes(chunk.data) for chunk in stored.chunks.all())
    rebuilt = json.loads(data)
    for key in ("trust_remote_code", "auto_mapping", "revision", "evil_key"):
        assert key not in rebuilt
    assert data == config  # exactly what peft_core writes for this adapter


def test_a_seq_cls_adapter_on_tiny_bert_keeps_its_head(cast, upload, tmp_path):
    model = peft_core.apply(build_tiny("bert", "seq-cls", num_labels=3), peft_core.IA3Config())
    perturb(model, seed=3)
    peft_core.save_adapter(model, tmp_path, base_model_name_or_path="tiny-bert")
    response = upload(
        (tmp_path / "adapter_config.json").read_bytes(),
        (tmp_path / "adapter_model.safetensors").read_bytes(),
    )
    assert response.status_code == 201, response.content
    run = Run.objects.get()
    assert (run.method, run.base_model) == ("ia3", "tiny-bert")
    assert run.dataset == Dataset.objects.get(builtin_key="sample-sentiment")


def test_the_form_chooses_the_base_model_when_the_config_names_a_hub_id(cast, upload, lora):
    config, weights, _ = lora
    hub = _with(config, base_model_name_or_path="Qwen/Qwen2.5-0.5B")
    _assert_refused(upload(hub, weights), "is not registered here")
    response = upload(hub, weights, base_model="tiny-llama")
    assert response.status_code == 201, response.content
    assert Run.objects.get().base_model == "tiny-llama"


def test_a_path_traversal_file_name_is_ignored(cast, upload, lora, tmp_path):
    config, weights, _ = lora
    response = upload(config, weights, weights_name="../../../../tmp/evil.safetensors")
    assert response.status_code == 201, response.content
    names = set(Artifact.objects.values_list("name", flat=True))
    assert names == {"adapter_config.json", "adapter_model.safetensors"}
    assert not Path("/tmp/evil.safetensors").exists()


# ---- refused: not safetensors, or a lying container ----------------------------------------


def _torch_zip() -> bytes:
    buffer = io.BytesIO()
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "weights",
    [pickle.dumps({"lora_A": [0.0] * 16}), _torch_zip(), b"\x00" * 4, b"{}"],
    ids=["pickle", "torch-save", "short", "json"],
)
def test_a_pickle_or_torch_file_renamed_safetensors_is_refused(upload, lora, weights):
    config, _, _ = lora
    _assert_refused(upload(config, weights), "not a safetensors file")


def test_the_page_refuses_a_pickle_with_the_message(cast, lora):
    config, _, _ = lora
    client = Client()
    client.force_login(cast.bob)
    body = {"project": cast.acme_project.id, "name": "pickle"}
    response = client.post(reverse("adapter_upload"), body | _files(config, pickle.dumps(object)))
    _assert_refused(response, "not a safetensors file")


def test_truncated_safetensors_is_refused(upload, lora):
    config, weights, _ = lora
    _assert_refused(upload(config, weights[: len(weights) - 100]), "not a safetensors file")


@pytest.mark.parametrize("delta", [1, 10_000, -5, 2**40])
def test_a_header_length_that_lies_is_refused(upload, lora, delta):
    config, weights, _ = lora
    length = int.from_bytes(weights[:8], "little")
    lying = (length + delta).to_bytes(8, "little") + weights[8:]
    _assert_refused(upload(config, lying), "not a safetensors file")


def test_a_tensor_whose_offsets_point_outside_the_file_is_refused(upload, lora):
    config, weights, _ = lora
    length = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4
    raw = json.dumps(header).encode()
    forged = len(raw).to_bytes(8, "little") + raw + weights[8 + length :]
    _assert_refused(upload(config, forged), "not a safetensors file")


def test_an_oversized_file_is_refused_before_it_is_read(settings, upload, lora):
    config, weights, _ = lora
    settings.ADAPTER_MAX_BYTES = 1024
    _assert_refused(upload(config, weights), "larger than")


# ---- refused: the config or the tensors do not fit ------------------------------------------


def test_a_base_model_outside_the_catalogue_is_refused(upload, lora):
    config, weights, _ = lora
    response = upload(config, weights, base_model="../../etc/passwd")
    _assert_refused(response, "Select a valid choice")
    evil = _with(config, base_model_name_or_path="/etc/passwd")
    _assert_refused(upload(evil, weights), "is not registered here")


def test_an_unknown_peft_type_is_refused(upload, lora):
    config, weights, _ = lora
    _assert_refused(upload(_with(config, peft_type="LOHA"), weights), "not supported")


@pytest.mark.parametrize(
    "config,text",
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"a": [[[[[[[[[[1]]]]]]]]]]}).encode(), "nested deeper"),
        (b"[" * 140_000 + b"]" * 140_000, "256 KiB"),
    ],
    ids=["text", "list", "deep", "huge"],
)
def test_a_malformed_config_is_refused(upload, lora, config, text):
    _, weights, _ = lora
    _assert_refused(upload(config, weights), text)


def test_a_shape_mismatch_with_the_base_model_is_refused(upload, lora):
    config, weights, _ = lora
    tensors = load(weights)
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(4, 32)  # tiny Llama's q_proj takes 64 features
    _assert_refused(upload(config, save(tensors)), "has shape (4, 32)")


def test_missing_tensors_are_refused(upload, lora):
    config, weights, _ = lora
    tensors = load(weights)
    tensors.pop(sorted(tensors)[0])
    _assert_refused(upload(config, save(tensors)), "do not fit this model")


def test_non_finite_values_are_refused(upload, lora):
    config, weights, _ = lora
    tensors = load(weights)
    tensors[sorted(tensors)[0]][0, 0] = float("nan")
    _assert_refused(upload(config, save(tensors)), "NaN or infinite")


def test_a_check_that_takes_too_long_is_killed_and_refused(settings, upload, lora):
    config, weights, _ = lora
    settings.ADAPTER_CHECK_TIMEOUT_S = 0.3  # the child cannot even import torch in time
    _assert_refused(upload(config, weights), "took too long")
    children = psutil.Process().children(recursive=True)
    assert not [p for p in children if "adapter_check" in " ".join(p.cmdline())]


# ---- who may upload ----------------------------------------------------------------------------


def test_another_teams_project_is_answered_like_a_missing_id(cast, api, lora):
    config, weights, _ = lora
    client = api(cast.mallory)
    answers = [
        client.post(
            reverse("api-adapter-upload"),
            {"project": project, "name": "x"} | _files(config, weights),
            format="multipart",
        )
        for project in (cast.acme_project.id, 999_999)
    ]
    assert [a.status_code for a in answers] == [400, 400]
    assert answers[0].json() == answers[1].json()
    page = Client()
    page.force_login(cast.mallory)
    bodies = [
        page.post(reverse("adapter_upload"), {"project": p, "name": "x"} | _files(config, weights))
        for p in (cast.acme_project.id, 999_999)
    ]
    texts = [re.sub(r"[A-Za-z0-9]{64}", "CSRF", b.content.decode()) for b in bodies]
    assert [b.status_code for b in bodies] == [400, 400] and texts[0] == texts[1]
    assert "Acme" not in texts[0]
    assert not Run.objects.exists()


def test_a_viewer_may_not_upload(cast, api, upload, lora):
    config, weights, _ = lora
    response = upload(config, weights, user=cast.carol)
    assert response.status_code == 403
    page = Client()
    page.force_login(cast.carol)
    body = {"project": cast.acme_project.id, "name": "x"} | _files(config, weights)
    assert page.post(reverse("adapter_upload"), body).status_code == 400  # not offered
    with pytest.raises(PermissionDenied):
        services.adapter_upload_create(
            user=cast.carol,
            project=cast.acme_project,
            name="x",
            base_model="",
            **{f"{k}_file": v for k, v in _files(config, weights).items()},
        )
    assert not Run.objects.exists()


def test_remote_code_is_never_enabled_anywhere():
    """The flag is only ever written as off (explicitly, where a model directory is read)."""
    import re

    enabled = re.compile("trust_remote" + r"_code\s*[=:]\s*(?!False)")
    hits = [
        str(path.relative_to(ROOT))
        for folder in ("peft_core", "webapp", "workers")
        for path in (ROOT / folder).rglob("*.py")
        if enabled.search(path.read_text())
    ]
    assert not hits


def test_the_check_runs_under_a_memory_limit(monkeypatch, upload, lora):
    from webapp.experiments import adapter_upload

    config, weights, _ = lora
    monkeypatch.setattr(adapter_upload, "BASE_MEMORY_BYTES", 256 * 1024**2)  # torch cannot load
    _assert_refused(upload(config, weights), "memory")


def test_a_hub_id_of_a_catalogue_twin_names_that_model(cast, upload, lora):
    """PEFT Lab's downloads name a pretrained model by its Hub id; uploaded again, that id is
    the catalogue model: MiniLM here (its config is at hand, so the check is quick), which
    then refuses tiny-llama's causal-LM adapter for its task, not as an unknown model."""
    config, weights, _ = lora
    hub = _with(config, base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
    _assert_refused(upload(hub, weights), "the base model supports seq-cls, not causal-lm")


def test_an_adapter_for_a_registered_model_is_matched_by_its_directory(
    cast, upload, allowed_root, tmp_path
):
    """An HF PEFT LoRA trained elsewhere on the team's own model names its directory; the
    upload finds the registered model by it, and another team's upload does not."""
    from peft import LoraConfig, get_peft_model

    from peft_core.pretrained import load_directory
    from peft_core.sources import model_files
    from webapp.registry.models import BaseModel, ModelSource, ModelStatus

    directory = (allowed_root / "my-qwen").resolve()
    BaseModel.objects.create(
        team=cast.acme, name="my-qwen", source=ModelSource.LOCAL, location=str(directory),
        content_sha256=model_files(directory).content_sha256, status=ModelStatus.READY,
        tasks=["causal-lm", "seq-cls"],
    )  # fmt: skip
    base, _ = load_directory(directory, "causal-lm")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    config = (tmp_path / "adapter" / "adapter_config.json").read_bytes()
    weights = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert json.loads(config)["base_model_name_or_path"] == str(directory)

    refused = upload(config, weights, user=cast.mallory, project=cast.umbrella_project.id)
    assert refused.status_code == 400 and "is not registered here" in refused.content.decode()
    response = upload(config, weights)
    assert response.status_code == 201, response.content
    run = Run.objects.get(id=response.json()["id"])
    assert run.base_model == "my-qwen" and run.base_weights["location"] == str(directory)
    from webapp.experiments.artifacts import artifact_file

    saved = json.loads(artifact_file(run_id=run.id, kind="adapter", name="adapter_config.json"))
    assert saved["base_model_name_or_path"] == str(directory)
