"""The training glue on tiny-llama: a queued run trains, stores its adapter and metrics;
a duplicate delivery does nothing; a cancel stops it; a bad config fails with the reason."""

import io
import zipfile

import pytest
import safetensors.torch
import torch
from django.urls import reverse

import peft_core
from peft_core.catalogue import load_model
from webapp.experiments.models import MetricPoint, Run, RunStatus
from workers.training import MEASURE_QUICK, execute_run

pytestmark = pytest.mark.django_db

STEPS = 4


def _queued(cast, **fields) -> Run:
    defaults = {
        "project": cast.acme_project,
        "name": "tiny",
        "created_by": cast.alice,
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"],
        "method": "lora",
        "method_config": {"r": 4, "alpha": 8},
        "train_config": {"steps": STEPS, "batch_size": 2, "max_length": 64, "eval_every": 2},
        "total_steps": STEPS,
    }
    return Run.objects.create(**{**defaults, **fields})


def _adapter_dir(client, user, run, tmp_path):
    client.force_login(user)
    response = client.get(reverse("run_adapter_download", args=[run.id]))
    assert response.status_code == 200
    zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))).extractall(tmp_path)
    return tmp_path


def test_run_trains_to_success_and_downloads(cast, client, tmp_path):
    run = _queued(cast)
    assert execute_run(run.id, worker="test") == "succeeded"
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert run.step == STEPS and run.fence == 1 and run.finished_at is not None
    losses = MetricPoint.objects.filter(run=run, key="train_loss").order_by("step")
    assert [p.step for p in losses] == list(range(1, STEPS + 1))
    assert MetricPoint.objects.filter(run=run, key="eval_loss").count() >= 2
    assert run.summary["base_eval_loss"] > 0 and run.summary["eval_loss"] > 0
    profile = run.profile
    assert profile["trainable_params"] > 0 and 0 < profile["trainable_percent"] < 100
    assert profile["adapter_bytes"] == sum(a.size for a in run.artifacts.all())
    assert profile["base_ms"] > 0 and profile["adapter_ms"] > 0 and profile["merged_ms"] > 0
    assert profile["tokens_per_s"] > 0 and profile["peak_memory_mb"] > 0
    assert profile["memory_kind"] == "heap"  # the training's own peak, not RSS growth
    # tokens/s is read from the optimizer steps' own time, evaluations left out
    assert 0 < profile["train_s"] < profile["wall_s"]
    assert profile["tokens_per_s"] == pytest.approx(
        MetricPoint.objects.get(run=run, key="tokens", step=STEPS).value / profile["train_s"]
    )
    assert profile["latency_rounds"] == MEASURE_QUICK["rounds"] and profile["measure"] == "quick"
    assert profile["latency_batch"] == list(MEASURE_QUICK["batch"])
    assert profile["latency_logits"] == "last"  # a causal LM's prefill, as generation runs it
    assert profile["overhead_spread"] >= 0 and profile["merged_spread"] >= 0
    assert isinstance(profile["latency_flags"], list)
    assert profile["latency_conditions"]["runs_on_host"] >= 0
    assert MetricPoint.objects.filter(run=run, key="time/eval_s").count() >= 2
    assert len(profile["samples"]) == MEASURE_QUICK["samples"]
    assert {"prompt", "expected", "base", "adapter"} <= set(profile["samples"][0])

    directory = _adapter_dir(client, cast.bob, run, tmp_path)
    model, _ = load_model("tiny-llama", "causal-lm")
    model = peft_core.load_adapter(model, directory)
    assert peft_core.trainable_parameters(model) == run.profile["trainable_params"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


def test_duplicate_delivery_trains_once(cast):
    run = _queued(cast)
    assert execute_run(run.id, worker="first") == "succeeded"
    assert execute_run(run.id, worker="second") == "skipped"
    run.refresh_from_db()
    assert (run.attempt, run.worker) == (1, "first")
    assert run.artifacts.filter(name="adapter_model.safetensors").count() == 1


def test_cancel_flag_stops_training_within_a_step(cast):
    run = _queued(cast, cancel_requested=True, train_config={"steps": 50, "max_length": 64})
    assert execute_run(run.id, worker="test") == "cancelled"
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert run.step <= 1
    assert not run.artifacts.exists()


def test_bad_config_fails_with_a_reason(cast):
    run = _queued(cast, method_config={"r": 0})
    assert execute_run(run.id, worker="test") == "failed"
    run.refresh_from_db()
    assert (run.status, run.failure_class) == (RunStatus.FAILED, "config")
    assert run.error == "LoRA r must be an integer in 1..1024, got 0"


def test_seq_cls_run_reports_accuracy(cast):
    run = _queued(
        cast,
        base_model="tiny-bert",
        dataset=cast.datasets["sample-sentiment"],
        train_config={"steps": 2, "batch_size": 4, "max_length": 48},
        total_steps=2,
    )
    assert execute_run(run.id, worker="test") == "succeeded"
    run.refresh_from_db()
    assert 0.0 <= run.summary["eval_accuracy"] <= 1.0
    assert 0.0 <= run.summary["base_eval_accuracy"] <= 1.0


@pytest.mark.parametrize(
    ("method", "config"),
    [
        ("dora", {"r": 4}),
        ("ia3", {}),
        ("prompt", {"num_virtual_tokens": 4, "init": "text", "init_text": "Answer:"}),
        ("prefix", {"num_virtual_tokens": 4, "projection_dim": 8}),
        ("bottleneck", {"placement": "parallel", "bottleneck_dim": 8, "scaling": 2.0}),
        ("mam", {"num_virtual_tokens": 4, "bottleneck_dim": 8}),
    ],
)
def test_every_method_runs_on_the_worker(cast, method, config, tmp_path, client):
    run = _queued(cast, method=method, method_config=config, train_config={"steps": 2})
    assert execute_run(run.id, worker="test") == "succeeded"
    run.refresh_from_db()
    mergeable = method in ("dora", "ia3")
    assert run.profile["mergeable"] is mergeable
    assert ("merged_ms" in run.profile) is mergeable
    directory = _adapter_dir(client, cast.alice, run, tmp_path)
    model, _ = load_model("tiny-llama", "causal-lm")
    model = peft_core.load_adapter(model, directory)
    # What was saved is what loads (a prefix MLP is folded into its table when saving).
    saved = safetensors.torch.load_file(directory / "adapter_model.safetensors")
    assert peft_core.trainable_parameters(model) == sum(t.numel() for t in saved.values())


class _Crash(BaseException):
    """Stands in for the process dying: no `except Exception` in the worker catches it."""


def test_a_lost_run_resumes_from_its_checkpoint_to_the_same_adapter(cast, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    from webapp.experiments import leases
    from workers import training

    config = {"steps": 8, "batch_size": 2, "max_length": 64, "checkpoint_every": 3}
    fields = {"method": "lora", "method_config": {"r": 4, "dropout": 0.1}, "train_config": config}
    whole, crashed = _queued(cast, **fields), _queued(cast, **fields)
    assert execute_run(whole.id, worker="w0") == "succeeded"

    store = training.RunCallbacks.on_checkpoint

    def die_after_the_second_checkpoint(self, checkpoint):
        store(self, checkpoint)
        if checkpoint.step == 6:
            raise _Crash

    monkeypatch.setattr(training.RunCallbacks, "on_checkpoint", die_after_the_second_checkpoint)
    with pytest.raises(_Crash):
        execute_run(crashed.id, worker="w1")
    monkeypatch.undo()
    assert set(leases.checkpoint_files(run_id=crashed.id)) == {
        "checkpoint.json",
        "checkpoint.safetensors",
    }
    old = timezone.now() - timedelta(minutes=5)
    Run.objects.filter(id=crashed.id).update(heartbeat_at=old)
    assert leases.runs_reap(lease_s=30, max_attempts=3).lost == [crashed.id]

    assert execute_run(crashed.id, worker="w2") == "succeeded"
    crashed.refresh_from_db()
    assert (crashed.status, crashed.attempt, crashed.worker) == ("succeeded", 2, "w2")
    assert "resumed from step 6" in crashed.log
    assert sorted(crashed.artifacts.values_list("kind", "name")) == [
        ("adapter", "adapter_config.json"),
        ("adapter", "adapter_model.safetensors"),
    ]
    losses = MetricPoint.objects.filter(run=crashed, key="train_loss").order_by("step")
    assert [p.step for p in losses] == list(range(1, 9))  # no gap, no duplicate
    expected = MetricPoint.objects.filter(run=whole, key="train_loss").order_by("step")
    assert [p.value for p in losses] == [p.value for p in expected]

    def weights(run):
        artifact = run.artifacts.get(name="adapter_model.safetensors")
        data = b"".join(bytes(c) for c in artifact.chunks.values_list("data", flat=True))
        return safetensors.torch.load(data)

    resumed, uninterrupted = weights(crashed), weights(whole)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_a_run_in_bf16_with_accumulation_checkpointing_and_cosine_succeeds(cast):
    """The envelope through the worker: the base in bf16, the adapter's saved weights fp32,
    the seed and settings on the run."""
    train = {"steps": STEPS, "batch_size": 2, "max_length": 64, "eval_every": 2}
    train |= {"precision": "bf16", "grad_accum": 2, "gradient_checkpointing": True}
    train |= {"schedule": "cosine", "warmup_steps": 1, "seed": 5}
    run = _queued(cast, train_config=train)
    assert execute_run(run.id, worker="test") == "succeeded"
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error
    weights = run.artifacts.get(name="adapter_model.safetensors")
    from webapp.experiments.artifacts import artifact_file

    tensors = safetensors.torch.load(
        artifact_file(run_id=run.id, kind="adapter", name=weights.name)
    )
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    rates = MetricPoint.objects.filter(run=run, key="learning_rate").order_by("step")
    assert [round(p.value, 6) for p in rates][:2] == [2e-4, 2e-4]  # warmup 1, then the peak
    assert rates.last().value < rates.first().value


def test_a_qlora_run_trains_on_an_nf4_base_and_measures_no_merged_latency(cast):
    train = {"steps": STEPS, "batch_size": 2, "max_length": 64, "eval_every": 0}
    train |= {"precision": "bf16", "quantize": "nf4", "learning_rate": 1e-2}
    run = _queued(cast, train_config=train)
    assert execute_run(run.id, worker="test") == "succeeded"
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert run.summary["eval_loss"] < run.summary["base_eval_loss"]
    assert "merged_ms" not in run.profile and run.profile["adapter_ms"] > 0


def test_a_packed_run_succeeds_and_a_method_that_cannot_pack_fails_as_config(cast):
    train = {"steps": STEPS, "batch_size": 2, "max_length": 128, "eval_every": 0}
    run = _queued(cast, train_config=train | {"packing": True})
    unpacked = _queued(cast, train_config=train)
    for each in (run, unpacked):
        assert execute_run(each.id, worker="test") == "succeeded"
        each.refresh_from_db()
        assert each.status == RunStatus.SUCCEEDED, each.error
    tokens = {
        r.id: MetricPoint.objects.filter(run=r, key="tokens").order_by("step").last().value
        for r in (run, unpacked)
    }
    assert tokens[run.id] > tokens[unpacked.id]  # rows of several examples
    prompt = _queued(
        cast, method="prompt", method_config={}, train_config=train | {"packing": True}
    )
    assert execute_run(prompt.id, worker="test") == "failed"
    prompt.refresh_from_db()
    assert (prompt.status, prompt.failure_class) == (RunStatus.FAILED, "config")
    assert "prompt cannot train packed" in prompt.error


def test_the_busiest_conditions_keep_a_figure_one_sample_lacks():
    """runs_on_host is left out of a sample taken while the database is away."""
    from workers.training import _busiest

    before = {"device": "cpu", "load_1m": 1.5, "runs_on_host": 2}
    assert _busiest(before, {"device": "cpu", "load_1m": 3.0}) == {
        "device": "cpu", "load_1m": 3.0, "runs_on_host": 2,
    }  # fmt: skip
    assert _busiest({"load_1m": 0.5}, {"load_1m": 0.25}) == {"load_1m": 0.5}


def test_a_cpu_run_takes_its_share_of_the_host_s_cores_and_gives_it_back(cast):
    """Two runs training on one CPU host each take cores // processes threads (torch's
    default, every core in every process, makes their OpenMP threads wait on each other),
    and the worker's next run starts from the whole host again."""
    import os
    import socket

    from workers.cpu_share import threads_for

    before = torch.get_num_threads()
    assert before > 1, "a host of one core has nothing to share"
    host = socket.gethostname()
    cores = os.cpu_count()
    # another run on this host, over as many processes as it has cores: this one gets 1
    _queued(cast, name="neighbour", status=RunStatus.RUNNING, worker=f"worker@{host}:7",
            devices=cores)  # fmt: skip
    run = _queued(cast)
    assert execute_run(run.id, worker=f"worker@{host}:8") == "succeeded"
    run.refresh_from_db()
    share = threads_for(cores, cores + 1, before)
    assert share == 1 < before
    assert run.profile["training_conditions"]["threads"] == share
    assert run.profile["training_conditions"]["runs_on_host"] == 2
    assert torch.get_num_threads() == before  # restored for the worker's next run
