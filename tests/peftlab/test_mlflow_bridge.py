"""The MLflow bridge against a real MLflow file store in tmp_path and the app in process:
import (params, metrics with steps, tags, status, times, adapter and files; again: skipped
or refreshed), export (the same, backwards; again: skipped), and the round trip export →
import giving back the same points, configs and tags."""

import subprocess
import sys

import pytest

from peft_core.tiny import build_tiny
from webapp.experiments.models import Artifact, MetricPoint, Run

mlflow = pytest.importorskip("mlflow", reason="the dev extra installs mlflow-skinny")
from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = pytest.mark.django_db(transaction=True)  # requests run as the server's do

T0 = 1_767_225_600_000  # 2026-01-01, in MLflow's milliseconds


@pytest.fixture
def store(tmp_path, monkeypatch):
    """(tracking URI, MlflowClient) of a fresh file store."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it
    uri = (tmp_path / "mlruns").as_uri()
    return uri, MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A LoRA on the catalogue's tiny Llama in HF PEFT's layout, as a script would save it."""
    import peft_core

    model = peft_core.apply(build_tiny("llama"), peft_core.LoraConfig(r=4))
    directory = tmp_path_factory.mktemp("adapter")
    peft_core.save_adapter(model, directory, base_model_name_or_path="tiny-llama")
    return directory


def _points(run_id: int) -> list[tuple]:
    rows = MetricPoint.objects.filter(run_id=run_id).values_list("key", "step", "value")
    return sorted(rows)


def _mlflow_points(client: MlflowClient, run_id: str) -> list[tuple]:
    run = client.get_run(run_id)
    return sorted(
        (key, m.step, m.value)
        for key in run.data.metrics
        for m in client.get_metric_history(run_id, key)
    )


def test_import_brings_runs_in_once_and_refreshes_a_running_one(
    store, peftlab, cast, adapter_dir, tmp_path
):
    uri, ml = store
    experiment = ml.create_experiment("sft")
    done = ml.create_run(
        experiment, start_time=T0, run_name="lora-a", tags={"owner": "alice", "baseline": ""}
    )
    done_id = done.info.run_id
    params = {"base_model": "tiny-llama", "method": "lora", "method_config.r": "4"}
    params |= {"learning_rate": "0.0002", "num_train_epochs": "3", "lr_scheduler_type": "cosine"}
    for name, value in params.items():
        ml.log_param(done_id, name, value)
    losses = [Metric("train_loss", 2.0 / (s + 1), T0 + 1000 * s, s) for s in range(30)]
    evals = [Metric("eval accuracy", 0.25 * k, T0 + 10_000 * k, 10 * k) for k in (1, 2)]
    odd = [Metric("train_loss", float("nan"), T0, 30), Metric("train_loss", 1.0, T0, -1)]
    ml.log_batch(done_id, metrics=losses + evals + odd)
    (tmp_path / "art" / "checkpoint" / "adapter").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        target = tmp_path / "art" / "checkpoint" / "adapter" / name
        target.write_bytes((adapter_dir / name).read_bytes())
    (tmp_path / "art" / "notes").mkdir()
    (tmp_path / "art" / "notes" / "readme.txt").write_text("trained on the cluster\n")
    ml.log_artifacts(done_id, str(tmp_path / "art"))
    ml.set_terminated(done_id, "FINISHED", end_time=T0 + 60_000)
    running = ml.create_run(experiment, start_time=T0 + 1, run_name="still going")
    running_id = running.info.run_id
    ml.log_batch(running_id, metrics=[Metric("loss", 1.0 / (s + 1), T0, s) for s in range(5)])

    first = peftlab("import", "mlflow", "--tracking-uri", uri, "--experiment", "sft")
    assert first.code == 0, first.err + first.out
    imported = Run.objects.get(tags__name=f"mlflow:{done_id}")
    assert (imported.name, imported.base_model, imported.method) == ("lora-a", "tiny-llama", "lora")
    assert imported.external and imported.status == "succeeded" and imported.dataset_id is None
    assert imported.method_config == {"r": 4}
    config = imported.train_config
    assert (config["learning_rate"], config["num_train_epochs"]) == (0.0002, 3)
    assert config["lr_scheduler_type"] == "cosine"
    origin = config["mlflow_run"]
    assert (origin["run_id"], origin["experiment"]) == (done_id, "sft")
    assert origin["start_time"] == "2026-01-01T00:00:00+00:00"
    assert origin["end_time"] == "2026-01-01T00:01:00+00:00"
    assert {t.name for t in imported.tags.all()} == {f"mlflow:{done_id}", "owner=alice", "baseline"}
    # Every finite point at a step PEFT Lab takes; the key with a space renamed.
    expected = sorted(("train_loss", m.step, m.value) for m in losses)
    expected += [("eval_accuracy", m.step, m.value) for m in evals]
    assert _points(imported.id) == sorted(expected)
    assert MetricPoint.objects.get(run=imported, key="train_loss", step=3).wall_time == 3.0
    assert imported.summary == {"eval_accuracy": 0.5, "train_loss": losses[-1].value}
    files = {(a.kind, a.name) for a in Artifact.objects.filter(run=imported)}
    assert {("adapter", "adapter_config.json"), ("adapter", "adapter_model.safetensors")} <= files
    assert ("file", "notes__readme.txt") in files
    left = Run.objects.get(tags__name=f"mlflow:{running_id}")
    assert left.status == "running" and len(_points(left.id)) == 5
    assert "left running" in first.out and "2 points left out" in first.out

    ml.log_batch(running_id, metrics=[Metric("loss", 0.1, T0, s) for s in range(5, 9)])
    ml.set_terminated(running_id, "FAILED")
    again = peftlab("import", "mlflow", "--tracking-uri", uri, "--experiment", "sft")
    assert again.code == 0, again.err + again.out
    assert f"skipped, already imported as run #{imported.id}" in again.out
    left.refresh_from_db()
    assert left.status == "failed" and [s for _, s, _ in _points(left.id)] == list(range(9))
    assert Run.objects.count() == 2 and len(_points(imported.id)) == len(expected)


def test_export_then_import_gives_back_the_same_run(store, peftlab, client, adapter_dir):
    uri, ml = store
    method_config = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init": "gaussian"}
    method_config["label"] = "8"  # a string that reads as a number stays a string
    train_config = {"steps": 40, "lr": 2e-4, "schedule": {"warmup": {"ratio": 0.1, "on": True}}}
    run = client.start_external_run(
        base_model="tiny-llama",
        method="lora",
        name="ours",
        method_config=method_config,
        train_config=train_config,
        tags=["exp=1", "baseline"],
    )
    points = [{"key": "train_loss", "step": s, "value": 3.0 / (s + 1)} for s in range(40)]
    points += [{"key": "eval_loss", "step": s, "value": 1.5 - s / 100} for s in (10, 20, 30, 40)]
    client.ingest_metrics(run["id"], points)
    client.upload_artifact(run["id"], adapter_dir, kind="adapter")
    summary = {"eval_loss": 1.1, "eval_exact_match": 0.5}
    client.finish_run(run["id"], "succeeded", summary=summary)

    sent = peftlab("export", "mlflow", "--tracking-uri", uri, "--experiment", "out", run["id"])
    assert sent.code == 0, sent.err + sent.out
    experiment = ml.get_experiment_by_name("out").experiment_id
    (exported,) = ml.search_runs([experiment])
    mlflow_id = exported.info.run_id
    assert exported.info.status == "FINISHED" and exported.info.run_name == "ours"
    params = exported.data.params
    assert (params["base_model"], params["method"]) == ("tiny-llama", "lora")
    assert params["method_config.r"] == "4" and params["method_config.label"] == '"8"'
    assert params["method_config.target_modules"] == '["q_proj", "v_proj"]'
    assert params["train_config.schedule.warmup.on"] == "true"
    tags = exported.data.tags
    assert (tags["exp"], tags["baseline"], tags["peftlab.run_id"]) == ("1", "", str(run["id"]))
    expected = sorted((p["key"], p["step"], p["value"]) for p in points)
    # The summary's value no series holds lands at the last step.
    assert _mlflow_points(ml, mlflow_id) == sorted([*expected, ("eval_exact_match", 40, 0.5)])
    names = {a.path for a in ml.list_artifacts(mlflow_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= names
    again = peftlab("export", "mlflow", "--tracking-uri", uri, "--experiment", "out", run["id"])
    assert again.code == 0 and f"already exported as MLflow run {mlflow_id}" in again.out
    assert len(ml.search_runs([experiment])) == 1

    # The adapter's way in is the test above's; here each check of it would cost seconds.
    back = peftlab(
        "import", "mlflow", "--tracking-uri", uri, "--experiment", "out", "--no-artifacts"
    )
    assert back.code == 0, back.err + back.out
    twin = Run.objects.get(tags__name=f"mlflow:{mlflow_id}")
    original = Run.objects.get(id=run["id"])
    assert _points(twin.id) == sorted([*expected, ("eval_exact_match", 40, 0.5)])
    assert twin.method_config == original.method_config == method_config
    assert {k: v for k, v in twin.train_config.items() if k != "mlflow_run"} == train_config
    assert {t.name for t in twin.tags.all()} == {"exp=1", "baseline", f"mlflow:{mlflow_id}"}
    assert (twin.base_model, twin.method, twin.status) == ("tiny-llama", "lora", "succeeded")
    assert twin.summary["eval_loss"] == 1.1 and twin.summary["eval_exact_match"] == 0.5
    assert not Artifact.objects.filter(run=twin).exists()


def test_an_import_past_the_key_cap_says_so_and_keeps_what_fits(store, peftlab, settings):
    settings.METRIC_KEYS_PER_RUN = 2
    uri, ml = store
    run = ml.create_run(ml.create_experiment("wide"), start_time=T0)
    ml.log_batch(run.info.run_id, metrics=[Metric(k, 1.0, T0, 0) for k in ("a", "b", "c")])
    ml.set_terminated(run.info.run_id, "FINISHED")
    result = peftlab("import", "mlflow", "--tracking-uri", uri, "--no-artifacts")
    assert result.code == 1
    assert "metric 'c' and those after it not sent: 400: A run takes at most 2" in result.out
    imported = Run.objects.get(tags__name=f"mlflow:{run.info.run_id}")
    assert imported.status == "succeeded" and [k for k, _, _ in _points(imported.id)] == ["a", "b"]


def test_a_running_run_is_not_exported(store, peftlab, client):
    uri, ml = store
    run = client.start_external_run(base_model="any", method="full")
    result = peftlab("export", "mlflow", "--tracking-uri", uri, run["id"])
    assert result.code == 1 and "it is running: export it once it has finished" in result.out
    assert ml.search_runs([ml.get_experiment_by_name("PEFT Lab").experiment_id]) == []


def test_without_mlflow_the_bridge_says_what_to_install(peftlab, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    result = peftlab("import", "mlflow", "--tracking-uri", str(tmp_path))
    assert result.code == 1 and "pip install 'peftlab[mlflow]'" in result.err


def test_the_cli_and_client_never_import_mlflow_until_the_bridge_runs():
    code = "import sys, peftlab.cli, peftlab.client; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
