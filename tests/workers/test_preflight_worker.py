"""The worker's pre-flight: a run on a model far beyond the machine fails at once as config,
with the numbers and what would fit, before any weight is read; a run that fits trains and
says what it was estimated to need."""

import pytest

from peft_core.sources import model_files
from tests.peft_core.test_preflight import huge_llama
from webapp.experiments.models import FailureClass, Run, RunStatus
from workers import cache as model_cache
from workers.training import execute_run

pytestmark = pytest.mark.django_db

TRAIN = {"steps": 2, "batch_size": 2, "learning_rate": 1e-3, "max_length": 48}


@pytest.fixture(scope="module")
def huge_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("huge-models")
    huge_llama(root / "huge-llama")
    return root


def _run(cast, **fields) -> Run:
    return Run.objects.create(
        project=cast.acme_project, name="preflight", created_by=cast.alice,
        dataset=cast.datasets["sample-instructions"], method="lora", method_config={},
        train_config=TRAIN, total_steps=2, **fields,
    )  # fmt: skip


def test_a_model_too_big_for_the_machine_fails_as_config_before_loading(
    cast, settings, huge_root, monkeypatch
):
    settings.MODEL_ROOTS = [huge_root]
    directory = huge_root / "huge-llama"
    weights = {
        "name": "huge-llama",
        "source": "local",
        "location": str(directory),
        "content_sha256": model_files(directory).content_sha256,
        "dtype": "bfloat16",
    }
    loads = []
    monkeypatch.setattr(model_cache, "load_weights", lambda *a, **k: loads.append(a))
    run = _run(cast, base_model="huge-llama", base_weights=weights)

    assert execute_run(run.id, worker="test") == "failed"

    run.refresh_from_db()
    assert run.status == RunStatus.FAILED and run.failure_class == FailureClass.CONFIG
    assert run.error.startswith("this run would not fit in memory: needs ~")
    assert " GiB free" in run.error and "smaller model" in run.error
    assert loads == []  # nothing was loaded: the 205 GB of holes were never read


def test_a_run_that_fits_trains_and_logs_its_estimate(cast):
    run = _run(cast, base_model="tiny-llama")
    assert execute_run(run.id, worker="test") == "succeeded"
    run.refresh_from_db()
    assert any(line.startswith("pre-flight: needs ~") for line in run.log_lines())


def test_the_pre_flight_can_be_turned_off(cast, settings, huge_root, monkeypatch):
    """PEFTLAB_PREFLIGHT=0: the worker goes on to load the model (here refused by a stand-in
    loader, so nothing is read either)."""
    settings.MODEL_ROOTS, settings.PREFLIGHT = [huge_root], False
    directory = huge_root / "huge-llama"
    weights = {
        "name": "huge-llama",
        "source": "local",
        "location": str(directory),
        "content_sha256": model_files(directory).content_sha256,
    }

    def refuse(*args, **kwargs):
        raise MemoryError("the stand-in loader")

    monkeypatch.setattr(model_cache, "load_weights", refuse)
    run = _run(cast, base_model="huge-llama", base_weights=weights)
    assert execute_run(run.id, worker="test") == "failed"
    run.refresh_from_db()
    assert run.failure_class == FailureClass.OUT_OF_MEMORY and "stand-in loader" in run.error
