"""A run on an uploaded dataset reads its rows from the artifact store through the sha256
check: it trains on them when they are intact, and fails for its dataset when one byte is not."""

import pytest

from webapp.experiments import services
from webapp.experiments.models import FailureClass, Run, RunStatus
from workers.training import execute_run

pytestmark = pytest.mark.django_db

ROWS = b"prompt,completion\n" + b"".join(b"say %d,%d\n" % (i, i) for i in range(30))


@pytest.fixture
def root(settings, tmp_path):
    location = tmp_path / "artifacts"
    backend = {"BACKEND": "webapp.experiments.store.WriteOnceFileStorage"}
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {**backend, "OPTIONS": {"location": str(location)}},
    }
    return location


def _run_on_upload(cast) -> Run:
    dataset = services.dataset_upload_create(
        user=cast.alice, team=cast.acme, name="pairs", filename="p.csv", data=ROWS, task="causal-lm"
    )
    return Run.objects.create(
        project=cast.acme_project,
        name="on an upload",
        created_by=cast.alice,
        base_model="tiny-llama",
        dataset=dataset,
        method="lora",
        method_config={"r": 4, "alpha": 8},
        train_config={"steps": 2, "batch_size": 2, "max_length": 32, "eval_every": 2},
        total_steps=2,
    )


def test_a_run_trains_on_the_rows_of_its_stored_file(cast, root):
    run = _run_on_upload(cast)
    assert execute_run(run.id, worker="test") == "succeeded"
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert "(27 train / 3 val rows)" in run.log


def test_a_flipped_byte_in_the_dataset_file_fails_the_run_with_the_reason(cast, root):
    run = _run_on_upload(cast)
    path = root / run.dataset.file_key
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last row's digits: still JSON, another row
    path.write_bytes(bytes(data))
    assert execute_run(run.id, worker="test") == "failed"
    run.refresh_from_db()
    assert (run.status, run.failure_class) == (RunStatus.FAILED, FailureClass.DATASET)
    assert run.error.startswith("the dataset file is damaged")
    assert run.step == 0 and not run.artifacts.exists()
