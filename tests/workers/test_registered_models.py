"""A team's own model in the worker: inspected on the meta device, refused when transformers
cannot build it; a Hub id from the HF cache trains offline and its adapter names id and
commit; files changed after registration fail the run with the reason. (Every method trained
on it from the browser, its adapters loading in HF PEFT: tests/e2e/test_own_model.py.)"""

import io
import json
import shutil
import zipfile

import pytest
from django.urls import reverse

import peft_core
from peft_core.methods import METHOD_LIST
from peft_core.pretrained import load_directory
from tests.peft_core.test_sources import fill_hub_cache
from webapp.experiments.models import FailureClass, Run
from webapp.registry import services
from webapp.registry.models import BaseModel, ModelStatus
from workers.inspection import inspect_registered_model
from workers.training import execute_run

pytestmark = pytest.mark.django_db

TRAIN = {"steps": 2, "batch_size": 2, "learning_rate": 1e-3, "max_length": 48, "eval_every": 0}


@pytest.fixture
def my_qwen(cast, allowed_root):
    model = services.model_register(user=cast.alice, team=cast.acme, name="my-qwen", path="my-qwen")
    assert inspect_registered_model(model.id) == "ready"
    model.refresh_from_db()
    return model


def test_the_inspection_records_what_the_model_page_shows(my_qwen, client, cast, allowed_root):
    facts = my_qwen.facts
    assert my_qwen.status == ModelStatus.READY and my_qwen.tasks == ["causal-lm", "seq-cls"]
    assert (facts["model_type"], facts["layers"], facts["hidden_size"]) == ("qwen2", 2, 64)
    assert (facts["heads"], facts["kv_heads"], facts["context_length"]) == (4, 2, 256)
    assert facts["dtype"] == "float32" and facts["has_chat_template"] is True
    real, _ = load_directory(allowed_root / "my-qwen", "causal-lm")
    assert facts["parameters"] == sum(p.numel() for p in real.parameters())
    lora = facts["structure"]["causal-lm"]["methods"]["lora"]
    assert lora["count"] == 4 and all(m.endswith(("q_proj", "v_proj")) for m in lora["modules"])
    peft_core.apply(real, peft_core.LoraConfig())
    assert lora["trainable"] == peft_core.trainable_parameters(real)
    assert set(facts["structure"]["causal-lm"]["methods"]) == {e.key for e in METHOD_LIST}

    client.force_login(cast.carol)
    page = client.get(reverse("model_detail", args=[my_qwen.id])).content.decode()
    assert "model.layers.&lt;i&gt;.self_attn.q_proj" in page  # a block's linear, once
    assert (
        "Methods on Qwen2ForCausalLM" in page
        and "Methods on Qwen2ForSequenceClassification" in page
    )
    assert "4 query, 2 key/value (grouped-query)" in page


def test_a_model_transformers_cannot_build_is_refused_with_the_reason(cast, allowed_root, tmp_path):
    odd = allowed_root / "odd-arch"
    shutil.copytree(allowed_root / "my-qwen", odd, dirs_exist_ok=True)
    try:
        config = json.loads((odd / "config.json").read_text())
        config["model_type"] = "no-such-architecture"
        (odd / "config.json").write_text(json.dumps(config))
        model = services.model_register(
            user=cast.alice, team=cast.acme, name="odd", path="odd-arch"
        )
        assert inspect_registered_model(model.id) == "refused"
    finally:
        shutil.rmtree(odd)
    model.refresh_from_db()
    assert model.status == ModelStatus.REFUSED and "no-such-architecture" in model.error


def _adapter_dir(client, run, tmp_path):
    response = client.get(reverse("run_adapter_download", args=[run.id]))
    assert response.status_code == 200
    target = tmp_path / f"run-{run.id}"
    zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))).extractall(target)
    return target


def test_a_hub_model_from_the_cache_trains_offline_and_its_adapter_names_id_and_commit(
    cast, settings, tmp_path, model_root, monkeypatch, client
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings.HF_HUB_CACHE = tmp_path / "hub"
    commit = fill_hub_cache(tmp_path / "hub", "acme/tiny-qwen", model_root / "my-qwen")
    model = services.model_register(
        user=cast.alice, team=cast.acme, name="hub-qwen", hub="acme/tiny-qwen@main"
    )
    assert inspect_registered_model(model.id) == "ready"
    run = Run.objects.create(
        project=cast.acme_project, name="hub", created_by=cast.alice, base_model="hub-qwen",
        base_weights=BaseModel.objects.get(id=model.id).weights(),
        dataset=cast.datasets["sample-instructions"], method="lora", method_config={},
        train_config=TRAIN, total_steps=2,
    )  # fmt: skip
    assert execute_run(run.id, worker="test") == "succeeded"
    client.force_login(cast.bob)
    saved = json.loads((_adapter_dir(client, run, tmp_path) / "adapter_config.json").read_text())
    assert (saved["base_model_name_or_path"], saved["revision"]) == ("acme/tiny-qwen", commit)


def test_files_changed_after_registration_fail_the_run_with_the_reason(my_qwen, cast, allowed_root):
    weights = my_qwen.weights() | {"content_sha256": "0" * 64}  # as if the files changed since
    run = Run.objects.create(
        project=cast.acme_project, name="changed", created_by=cast.alice, base_model="my-qwen",
        base_weights=weights, dataset=cast.datasets["sample-instructions"], method="lora",
        method_config={}, train_config=TRAIN, total_steps=2,
    )  # fmt: skip
    assert execute_run(run.id, worker="test") == "failed"
    run.refresh_from_db()
    assert (
        run.failure_class == FailureClass.MODEL and "changed since it was registered" in run.error
    )
