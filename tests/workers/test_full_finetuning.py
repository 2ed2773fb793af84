"""Full fine-tuning (`full`) on the worker: every weight trains, the run stores the whole
model (loadable by transformers alone, kept in the artifact store), its cost is measured
against the cached base and the cache's copy is never written into."""

import pytest
import torch
from django.urls import reverse

from peft_core.catalogue import load_model
from peft_core.pretrained import load_directory
from tests.workers.test_training import _adapter_dir
from tests.workers.test_training import _queued as queued
from webapp.experiments.models import Artifact, ArtifactHome, Run, RunStatus
from workers import cache as model_cache
from workers.training import execute_run

pytestmark = pytest.mark.django_db

STEPS = 3


TRAIN = {"steps": STEPS, "batch_size": 2, "max_length": 64, "eval_every": 3, "learning_rate": 1e-3}


def _queued(cast, **fields) -> Run:
    """test_training's queued run, as full fine-tuning."""
    defaults = {"name": "full", "method": "full", "method_config": {}, "train_config": TRAIN}
    return queued(cast, **{**defaults, **fields})


def test_a_full_fine_tuning_run_trains_every_weight_and_stores_the_whole_model(
    cast, client, tmp_path
):
    run = _queued(cast)
    assert execute_run(run.id, worker="test") == "succeeded"
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error
    base, _ = load_model("tiny-llama", "causal-lm")
    everything = sum(p.numel() for p in base.parameters())
    profile = run.profile
    assert profile["trainable_params"] == everything and profile["trainable_percent"] == 100.0
    # Measured against the cached base, interleaved, as the adapters are; nothing to merge.
    assert profile["mergeable"] is False and "merged_ms" not in profile
    assert profile["same_architecture"] is True and profile["base_ms"] > 0
    assert {"prompt", "base", "adapter"} <= set(profile["samples"][0])
    assert run.summary["base_eval_loss"] > run.summary["eval_loss"] > 0

    files = {a.name: a for a in Artifact.objects.filter(run=run)}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(files)
    assert "adapter_config.json" not in files
    assert {a.home for a in files.values()} == {ArtifactHome.STORE}  # model-sized: the store
    assert profile["adapter_bytes"] == sum(a.size for a in files.values())

    # transformers alone loads the download, and it is not the base any more
    model, tokenizer = load_directory(_adapter_dir(client, cast.alice, run, tmp_path), "causal-lm")
    ids = tokenizer("Reverse: abc", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)
    changed = [
        name
        for (name, p), (_, q) in zip(model.named_parameters(), base.named_parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert len(changed) == len(list(base.named_parameters()))  # every weight moved

    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert "fully fine-tuned" in page and "nothing to merge" in page and "Model size" in page

    # The cached base the run measured against is untouched (a run adapts a private copy).
    for entry in model_cache._models.values():
        assert entry.untouched()


def test_full_fine_tuning_refuses_a_quantised_base_and_merging(cast, client):
    run = _queued(cast, train_config={"steps": 1, "quantize": "nf4"})
    assert execute_run(run.id, worker="test") == "failed"
    run.refresh_from_db()
    assert "full fine-tuning cannot train a nf4 base" in run.error

    from webapp.experiments.exports import merged_export_refusal

    done = _queued(cast, status=RunStatus.SUCCEEDED)
    assert "whole model already" in merged_export_refusal(done)
