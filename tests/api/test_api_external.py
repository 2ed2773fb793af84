"""Free-form runs trained elsewhere through the API: any base model, method and bounded config,
no dataset, the sizes the script reports, and files uploaded to the run (an adapter checked
as an uploaded one is, or any file, streamed and hashed). Launched runs keep the launch form's
strict rules (tests/api/test_api_runs.py)."""

import hashlib
import io
import json
import zipfile

import pytest
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

import peft_core
from peft_core.tiny import build_tiny
from tests.peft_core.test_lora import perturb
from webapp.experiments import comparison, external, services
from webapp.experiments.models import Artifact, Run, RunStatus, Tag
from webapp.experiments.store import store_walk
from webapp.registry.models import BaseModel, ModelSource, ModelStatus

pytestmark = pytest.mark.django_db

NESTED = {
    "peft": {"lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
    "optim": {"name": "adamw", "betas": [0.9, 0.999]},
}


@pytest.fixture(autouse=True)
def _own_store(settings, tmp_path):
    """A fresh artifact store per test, so what a test finds there is its own."""
    backend = {"BACKEND": "webapp.experiments.store.WriteOnceFileStorage"}
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {**backend, "OPTIONS": {"location": str(tmp_path / "artifacts")}},
    }


def _create(client, **fields):
    body = {"external": True, "base_model": "meta-llama/Llama-3.1-8B", "method": "full"} | fields
    return client.post(reverse("api-runs"), body, format="json")


def _nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"child": value}
    return value


def test_a_free_form_run_keeps_what_its_script_says(cast, api):
    response = _create(
        api(cast.bob),
        name="full fine-tune on the cluster",
        method_config=NESTED,
        train_config={"max_steps": 500, "output_dir": "/scratch/x", "warmup_ratio": 0.1},
        tags=["cluster", "full", "cluster"],
        summary={"eval_loss": 1.5},
        profile={"trainable_params": 8_030_261_248, "total_params": 8_030_261_248},
    )
    assert response.status_code == 201, response.content
    data = response.json()
    assert (data["base_model"], data["method"], data["dataset"]) == (
        "meta-llama/Llama-3.1-8B",
        "full",
        None,
    )
    assert (data["status"], data["external"], data["total_steps"]) == ("running", True, 500)
    assert data["method_config"] == NESTED and data["summary"] == {"eval_loss": 1.5}
    assert sorted(data["tags"]) == ["cluster", "full"]
    assert data["profile"] == {
        "trainable_params": 8_030_261_248,
        "total_params": 8_030_261_248,
        "trainable_percent": 100.0,
    }
    run = Run.objects.get(id=data["id"])
    assert (run.project, run.created_by, run.base_weights, run.worker) == (
        cast.acme_project,
        cast.bob,
        {},
        "external",
    )
    assert Tag.objects.filter(run=run).count() == 2


def test_a_name_that_refers_to_a_model_here_is_linked(cast, api):
    client = api(cast.alice)
    bundled = _create(client, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", method="lora")
    assert bundled.json()["base_model"] == "smollm2-135m-instruct"
    assert Run.objects.get(id=bundled.json()["id"]).base_weights["source"] == "catalogue"
    for team, name in ((cast.acme, "acme-qwen"), (cast.umbrella, "umbrella-qwen")):
        BaseModel.objects.create(
            team=team,
            name=name,
            source=ModelSource.HUB,
            location=f"{team.name.lower()}/qwen",
            revision="main",
            status=ModelStatus.READY,
            tasks=["causal-lm"],
        )
    own = _create(client, base_model="acme/qwen@main")
    assert own.json()["base_model"] == "acme-qwen"
    assert Run.objects.get(id=own.json()["id"]).base_weights["location"] == "acme/qwen"
    # Another team's model is no model of Acme's: the name stays as it was given.
    theirs = _create(client, base_model="umbrella/qwen")
    assert theirs.json()["base_model"] == "umbrella/qwen"
    assert Run.objects.get(id=theirs.json()["id"]).base_weights == {}


def test_a_dataset_is_optional_and_must_be_the_teams(cast, api):
    client = api(cast.bob)
    sample = cast.datasets["sample-instructions"]
    named = _create(client, dataset=sample.id)
    assert named.json()["dataset"] == {"id": sample.id, "name": "sample-instructions"}
    assert _create(client, dataset=None).json()["dataset"] is None
    theirs = _create(api(cast.mallory), project=cast.umbrella_project.id)
    assert theirs.status_code == 201
    assert _create(client, project=cast.umbrella_project.id).status_code == 400
    assert _create(client, dataset=10**9).status_code == 400


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ({"method_config": {"blob": "x" * 70_000}}, "method_config", "65,536"),
        ({"train_config": _nested(9)}, "train_config", "8 levels"),
        ({"method_config": []}, "method_config", "dictionary"),
        ({"method": "m" * 61}, "method", "60"),
        ({"base_model": "b" * 201}, "base_model", "200"),
        ({"tags": [f"t{i}" for i in range(21)]}, "tags", "20"),
        ({"tags": ["x" * 51]}, "tags", "50"),
        ({"profile": {"flops": 1}}, "profile", "flops"),
        ({"profile": {"trainable_params": -1}}, "profile", "integer"),
        ({"profile": {"adapter_bytes": True}}, "profile", "integer"),
        ({"profile": {"adapter_bytes": "12"}}, "profile", "integer"),
        ({"profile": {"trainable_params": 9, "total_params": 8}}, "profile", "exceed"),
        ({"summary": {"x": "y" * 100_001}}, "summary", "100,000"),
    ],
)
def test_bounds_are_a_400_naming_the_limit(cast, api, change, field, says):
    response = _create(api(cast.bob), **change)
    assert response.status_code == 400, response.content
    assert says in json.dumps(response.json()[field])
    assert not Run.objects.exists()


def test_a_config_at_the_bounds_is_kept(cast, api):
    deep = _nested(8)
    big = {"blob": "x" * (external.CONFIG_MAX_BYTES - len('{"blob":""}'))}
    response = _create(api(cast.bob), method_config=deep, train_config=big)
    assert response.status_code == 201, response.content
    run = Run.objects.get()
    assert (run.method_config, run.train_config) == (deep, big)


def test_a_viewer_cannot_create_and_a_launch_stays_strict(cast, api):
    assert _create(api(cast.carol)).status_code == 403
    launch = {
        "base_model": "meta-llama/Llama-3.1-8B",
        "dataset": cast.datasets["sample-instructions"].id,
        "method": "full",
        "method_config": NESTED,
    }
    response = api(cast.bob).post(reverse("api-runs"), launch, format="json")
    assert response.status_code == 400
    assert {"method_config"} <= set(response.json())
    assert not Run.objects.exists()


def test_finish_adds_the_reported_sizes(cast, api):
    client = api(cast.bob)
    run_id = _create(client, profile={"total_params": 1000}).json()["id"]
    finish = reverse("api-run-finish", args=[run_id])
    refused = client.post(
        finish, {"status": "succeeded", "profile": {"trainable_params": 2000}}, format="json"
    )
    assert refused.status_code == 400 and "exceed" in json.dumps(refused.json())
    body = {"status": "succeeded", "profile": {"trainable_params": 10, "adapter_bytes": 4096}}
    done = client.post(finish, body, format="json")
    assert done.status_code == 200, done.content
    assert done.json()["profile"] == {
        "total_params": 1000,
        "trainable_params": 10,
        "adapter_bytes": 4096,
        "trainable_percent": 1.0,
    }
    row = comparison.tradeoff_rows([Run.objects.get(id=run_id)])[0]
    assert (row["trainable_params"], row["trainable_percent"], row["adapter_bytes"]) == (
        10,
        1.0,
        4096,
    )


# ---- files uploaded to a run ----------------------------------------------------------------


def _upload(client, run_id: int, **fields):
    return client.post(reverse("api-run-artifacts", args=[run_id]), fields, format="multipart")


def _file(data: bytes, name: str = "metrics.jsonl") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, data, "application/octet-stream")


def _file_keys(run_id: int) -> list[str]:
    return list(store_walk(f"runs/{run_id}/file/"))


def test_a_file_is_streamed_in_hashed_and_versioned(cast, api):
    client = api(cast.bob)
    run_id = _create(client).json()["id"]
    data = b"line\n" * 200_000  # 1 MB
    digest = hashlib.sha256(data).hexdigest()
    first = _upload(client, run_id, kind="file", file=_file(data), sha256=digest.upper())
    assert first.status_code == 201, first.content
    [stored] = first.json()
    assert (stored["kind"], stored["name"], stored["version"]) == ("file", "metrics.jsonl", 1)
    assert (stored["size"], stored["sha256"], stored["home"]) == (len(data), digest, "store")
    assert client.get(reverse("api-run-artifacts", args=[run_id])).json() == [stored]
    download = client.get(stored["download_url"])
    assert download.status_code == 200 and b"".join(download) == data
    again = _upload(client, run_id, kind="file", file=_file(b"v2"), name="metrics.jsonl")
    assert again.json()[0]["version"] == 2
    named = _upload(client, run_id, kind="file", file=_file(b"{}"), name="résumé (final).json")
    assert named.status_code == 201 and named.json()[0]["name"] == "résumé (final).json"
    served = client.get(named.json()[0]["download_url"])
    assert b"".join(served) == b"{}"
    assert "filename*=utf-8''r%C3%A9sum%C3%A9" in served["Content-Disposition"]
    assert len(_file_keys(run_id)) == 3


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"sha256": "0" * 64}, "not the"),
        ({"sha256": "xyz"}, "64 hexadecimal"),
        ({"name": "../../etc/passwd"}, "path parts"),
        ({"name": "a\\b"}, "path parts"),
        ({"name": ".."}, "path parts"),
        ({"name": " padded"}, "printable"),
        ({"name": "bell\x07"}, "printable"),
        ({"name": "n" * 201}, "200"),
    ],
)
def test_a_refused_file_leaves_nothing(cast, api, fields, says):
    client = api(cast.bob)
    run_id = _create(client).json()["id"]
    response = _upload(client, run_id, kind="file", file=_file(b"data"), **fields)
    assert response.status_code == 400, response.content
    assert says in json.dumps(response.json())
    assert not Artifact.objects.exists() and _file_keys(run_id) == []


def test_a_body_over_the_cap_is_refused_unread(cast, api, settings):
    client = api(cast.bob)
    run_id = _create(client).json()["id"]
    settings.RUN_FILE_MAX_BYTES = 1024
    big = _upload(client, run_id, kind="file", file=_file(b"x" * (2 * 1024 * 1024)))
    assert big.status_code == 413 and "PEFTLAB_RUN_FILE_MAX_BYTES" in big.json()["detail"]
    # Within the body's framing allowance but over the cap: the file's own size decides.
    over = _upload(client, run_id, kind="file", file=_file(b"x" * 2048))
    assert over.status_code == 400 and "larger than" in over.json()["detail"]
    assert not Artifact.objects.exists() and _file_keys(run_id) == []


def test_who_may_upload_to_which_run(cast, api, make_run):
    bob = api(cast.bob)
    run_id = _create(bob).json()["id"]
    assert _upload(api(cast.mallory), run_id, kind="file", file=_file(b"x")).status_code == 404
    assert _upload(api(cast.carol), run_id, kind="file", file=_file(b"x")).status_code == 403
    launched = make_run(status=RunStatus.SUCCEEDED)
    refused = _upload(bob, launched.id, kind="file", file=_file(b"x"))
    assert refused.status_code == 400 and "trained elsewhere" in refused.json()["detail"]
    evaluating = make_run(external=True, status=RunStatus.QUEUED)  # an uploaded adapter's run
    assert _upload(bob, evaluating.id, kind="file", file=_file(b"x")).status_code == 409
    assert _upload(bob, run_id, kind="adapter").status_code == 400  # its files are missing
    finish = reverse("api-run-finish", args=[run_id])
    assert bob.post(finish, {"status": "failed"}, format="json").status_code == 200
    assert _upload(bob, run_id, kind="file", file=_file(b"x")).status_code == 201
    assert Artifact.objects.filter(run_id=run_id).count() == 1


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    """A LoRA on the catalogue's tiny Llama, as peft_core saves it in HF PEFT's layout:
    (config, weights, its trainable parameters)."""
    model = peft_core.apply(build_tiny("llama"), peft_core.LoraConfig(r=4))
    perturb(model, seed=5)
    directory = tmp_path_factory.mktemp("lora")
    peft_core.save_adapter(model, directory, base_model_name_or_path="tiny-llama")
    return (
        (directory / "adapter_config.json").read_bytes(),
        (directory / "adapter_model.safetensors").read_bytes(),
        peft_core.trainable_parameters(model),
    )


def _adapter(config: bytes, weights: bytes, *_) -> dict:
    return {
        "kind": "adapter",
        "config_file": SimpleUploadedFile("adapter_config.json", config),
        "weights_file": SimpleUploadedFile("adapter_model.safetensors", weights),
    }


def test_an_adapter_is_checked_stored_as_versions_and_downloads(cast, api, tiny_lora):
    client = api(cast.bob)
    run_id = _create(client, base_model="tiny-llama", method="lora", method_config=NESTED).json()[
        "id"
    ]
    first = _upload(client, run_id, **_adapter(*tiny_lora))
    assert first.status_code == 201, first.content
    assert sorted((a["name"], a["version"]) for a in first.json()) == [
        ("adapter_config.json", 1),
        ("adapter_model.safetensors", 1),
    ]
    run = Run.objects.get(id=run_id)
    sizes = sum(a["size"] for a in first.json())
    assert run.profile["adapter_bytes"] == sizes
    assert run.profile["trainable_params"] == tiny_lora[2]  # what the adapter holds
    assert "Adapter version 1 uploaded: lora on tiny-llama" in run.log
    second = _upload(client, run_id, **_adapter(*tiny_lora))
    assert {a["version"] for a in second.json()} == {2}
    client.post(reverse("api-run-finish", args=[run_id]), {"status": "succeeded"}, format="json")

    client.force_login(cast.bob)  # the page's download, as for a launched run
    zipped = client.get(reverse("run_adapter_download", args=[run_id]))
    assert zipped.status_code == 200
    archive = zipfile.ZipFile(io.BytesIO(b"".join(zipped.streaming_content)))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(
        archive.namelist()
    )
    card = archive.read("README.md").decode()
    assert "it named no PEFT Lab dataset" in card and "Trained elsewhere" in card
    merged = client.get(reverse("api-run-merged", args=[run_id]))
    assert merged.status_code == 404 and "names no dataset" in merged.json()["detail"]


def test_an_adapter_of_an_unknown_base_is_kept_with_its_files_checked(cast, api, tiny_lora):
    """A base nobody registered here (a script's own model): the files are checked (valid
    safetensors, a config naming its peft_type), the shapes cannot be, and the log says so."""
    client = api(cast.bob)
    unknown = _create(client, base_model="my-own-llama", method="lora").json()["id"]
    pickled = _upload(client, unknown, **_adapter(tiny_lora[0], b"\x80\x04K\x01."))
    assert pickled.status_code == 400 and "not a safetensors file" in pickled.json()["detail"]
    no_type = json.dumps({"r": 8}).encode()
    untyped = _upload(client, unknown, **_adapter(no_type, tiny_lora[1]))
    assert untyped.status_code == 400 and "names no peft_type" in untyped.json()["detail"]
    assert not Artifact.objects.exists()
    kept = _upload(client, unknown, **_adapter(*tiny_lora))
    assert kept.status_code == 201, kept.json()
    assert {a["name"] for a in kept.json()} == {"adapter_config.json", "adapter_model.safetensors"}
    run = Run.objects.get(id=unknown)
    assert "my-own-llama is not a model registered here, so its shapes were not checked" in run.log
    assert run.profile["trainable_params"] == tiny_lora[2]
    known = _create(client, base_model="tiny-llama", method="lora").json()["id"]
    pickled = _upload(client, known, **_adapter(tiny_lora[0], b"\x80\x04K\x01."))
    assert pickled.status_code == 400 and "not a safetensors file" in pickled.json()["detail"]


def test_the_playground_refuses_a_run_on_a_base_not_held_here(cast, api):
    client = api(cast.bob)
    body = {"base_model": "my-own-llama", "method": "lora"}
    run_id = _create(client, dataset=cast.datasets["sample-instructions"].id, **body).json()["id"]
    client.post(reverse("api-run-finish", args=[run_id]), {"status": "succeeded"}, format="json")
    with pytest.raises(ValidationError, match="my-own-llama, which is not a model registered"):
        services.playground_prompt_create(
            user=cast.bob, runs=[Run.objects.get(id=run_id)], text="hi"
        )
