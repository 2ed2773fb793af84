"""A run with devices=2 on the CPU: the worker starts torchrun (gloo), two ranks train their
halves of each batch, rank 0 writes the run's log, metrics, checkpoints and adapter under
the fence, and the adapter is the one a one-device run of the same settings stores."""

import pytest
from safetensors.torch import load

from tests.workers.test_celery_worker import database_env
from webapp.experiments import artifacts
from webapp.experiments.models import Artifact, MetricPoint, Run, RunStatus
from workers.training import execute_run

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

TRAIN = {"steps": 4, "batch_size": 4, "max_length": 32, "eval_every": 2, "seed": 5,
         "checkpoint_every": 2}  # fmt: skip


def _run(cast, devices: int, **train) -> Run:
    return Run.objects.create(
        project=cast.acme_project,
        name=f"on {devices}",
        created_by=cast.alice,
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
        method="lora",
        method_config={"r": 4, "alpha": 8},  # LoRA's default dropout (0.05) stays on
        train_config=TRAIN | train,
        total_steps=TRAIN["steps"],
        devices=devices,
    )


def _weights(run: Run) -> dict:
    files = artifacts.artifact_files(run_id=run.id, kind="adapter")
    return load(files["adapter_model.safetensors"])


def test_a_two_device_run_trains_on_two_ranks_like_one(cast, monkeypatch, client):
    """DDP (whole bases) and FSDP (the base split over the ranks) alike."""
    monkeypatch.setenv("DATABASE_URL", database_env()["DATABASE_URL"])  # the ranks' database
    two, one = _run(cast, 2), _run(cast, 1)
    split = _run(cast, 2, parallel="fsdp")
    assert execute_run(two.id, worker="w:1") == RunStatus.SUCCEEDED
    assert execute_run(one.id, worker="w:1") == "succeeded"
    assert execute_run(split.id, worker="w:1") == "succeeded"
    split.refresh_from_db()
    assert "the base is split over 2 processes (FSDP)" in split.log
    assert "not measured under FSDP" in split.log
    assert split.profile["trainable_params"] > 0 and "base_ms" not in split.profile
    first, second = _weights(split), _weights(one)
    assert max((first[k] - second[k]).abs().max().item() for k in first) <= 1e-4
    client.force_login(cast.alice)
    page = client.get(f"/runs/{split.id}/")
    assert page.status_code == 200 and "fsdp" in page.content.decode()
    two.refresh_from_db()
    assert two.status == RunStatus.SUCCEEDED, two.log
    assert "training on 2 processes" in two.log
    assert sorted(Artifact.objects.filter(run=two).values_list("kind", "name")) == [
        ("adapter", "adapter_config.json"),
        ("adapter", "adapter_model.safetensors"),
    ]  # its checkpoint went when it ended
    losses = MetricPoint.objects.filter(run=two, key="train_loss").order_by("step")
    assert list(losses.values_list("step", flat=True)) == [1, 2, 3, 4]  # once each
    first, second = _weights(two), _weights(one)
    assert max((first[k] - second[k]).abs().max().item() for k in first) <= 1e-4
    assert two.summary["eval_loss"] == pytest.approx(
        Run.objects.get(id=one.id).summary["eval_loss"], abs=1e-5
    )
