"""docker-compose.yml cannot run here (no Docker engine): check what can be checked by
reading it against the code. Each `manage.py` command it runs exists, the store it names is
the bucket its MinIO init creates, and every app service waits for that bucket."""

import re
from pathlib import Path

import yaml
from django.core.management import get_commands

COMPOSE = yaml.safe_load((Path(__file__).parents[1] / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_every_manage_py_command_it_runs_exists():
    used = {
        service["command"][2]
        for service in SERVICES.values()
        if service.get("command", [None])[:2] == ["python", "manage.py"]
    }
    assert {"migrate", "reaper", "verify_artifacts"} <= used
    assert used <= set(get_commands())


def test_the_store_is_the_bucket_minio_bucket_creates():
    store = SERVICES["web"]["environment"]["PEFTLAB_ARTIFACT_STORE"]
    bucket = re.search(r"s3://([^/}]+)/", store).group(1)
    assert f"mc mb --ignore-existing store/{bucket}" in SERVICES["minio-bucket"]["entrypoint"][2]
    assert "minio:9000" in SERVICES["web"]["environment"]["PEFTLAB_S3_ENDPOINT_URL"]
    assert SERVICES["minio"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    waits = SERVICES["migrate"]["depends_on"]["minio-bucket"]["condition"]
    assert waits == "service_completed_successfully"
    for name in ("web", "worker", "reaper", "verifier"):
        assert SERVICES[name]["depends_on"]["migrate"]["condition"].startswith("service_compl")


def test_training_workers_serve_run_queues_and_the_playground_its_own():
    """The GPU worker takes its -Q from `manage.py worker_queues` (its class and devices) and no
    playground prompt; a playground worker of its own takes those and exports, in compose and
    in `make run` (bin/serve)."""
    from webapp.experiments.queue import PLAYGROUND_QUEUE, QUEUES

    worker = " ".join(SERVICES["worker"]["command"])
    assert '-Q "$$(python manage.py worker_queues)"' in worker and "playground" not in worker
    assert "worker_queues" in get_commands()
    playground = SERVICES["playground"]["command"]
    served = playground[playground.index("-Q") + 1].split(",")
    assert PLAYGROUND_QUEUE in served and set(served) == set(QUEUES.values())
    assert SERVICES["playground"]["depends_on"]["migrate"]["condition"].startswith("service_compl")
    serve = (Path(__file__).parents[1] / "bin" / "serve").read_text()
    assert 'RUN_QUEUES=$("$PY" manage.py worker_queues)' in serve
    assert 'worker -Q "$RUN_QUEUES"' in serve and "worker -Q playground,export" in serve
