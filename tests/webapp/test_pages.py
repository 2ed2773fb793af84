"""Pages: login, the new-run form, the run page and its live partial, downloads, datasets.
Another team's objects are 404; a viewer cannot launch."""

import io
import json
import re
import zipfile

import pytest
from django.core.management import call_command
from django.urls import reverse

from webapp.experiments import artifacts, leases, metrics
from webapp.experiments.models import Dataset, Run, RunStatus

pytestmark = pytest.mark.django_db


def _run(cast, **fields) -> Run:
    defaults = {
        "project": cast.acme_project,
        "name": "lora-r8",
        "created_by": cast.alice,
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"],
        "method": "lora",
        "method_config": {"r": 8},
        "train_config": {"steps": 5},
        "total_steps": 5,
    }
    return Run.objects.create(**{**defaults, **fields})


def _form(cast, **fields) -> dict:
    data = {
        "name": "first run",
        "project": cast.acme_project.id,
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "method": "lora",
        "r": 8,
        "alpha": 16,
        "dropout": 0.05,
        "target_modules": "all-linear",
        "steps": 30,
        "batch_size": 4,
        "learning_rate": 2e-4,
        "max_length": 128,
        "eval_every": 10,
    }
    return {**data, **fields}


def test_pages_need_login(client, cast):
    run = _run(cast)
    for url in [
        reverse("runs"),
        reverse("run_new"),
        reverse("run_detail", args=[run.id]),
        reverse("run_live", args=[run.id]),
        reverse("run_adapter_download", args=[run.id]),
        reverse("datasets"),
        reverse("dataset_upload"),
    ]:
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("login")), url


def test_health_is_public(client):
    assert client.get(reverse("health")).json() == {"status": "ok"}


def test_login_with_password(client, cast):
    response = client.post(reverse("login"), {"username": "alice", "password": "alice-pw-9"})
    assert response.status_code == 302
    assert client.get(reverse("runs")).status_code == 200


def test_new_run_form_explains_fields(client, cast):
    client.force_login(cast.alice)
    page = client.get(reverse("run_new")).content.decode()
    assert "Width of the low-rank update" in page
    assert "SmolLM2 135M Instruct" in page
    assert "sample-instructions" in page


def test_launch_creates_a_queued_run(client, cast):
    client.force_login(cast.bob)
    response = client.post(reverse("run_new"), _form(cast))
    run = Run.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("run_detail", args=[run.id])
    assert run.status == RunStatus.QUEUED
    assert run.method_config == {
        "r": 8,
        "alpha": 16.0,
        "dropout": 0.05,
        "target_modules": "all-linear",
        "use_rslora": False,
    }
    assert run.train_config["steps"] == 30 and run.total_steps == 30
    assert run.created_by == cast.bob


def _flashes(response) -> list[str]:
    return re.findall(r'<div class="flash flash-\w+" role="status" data-once>([^<]*)</div>',
                      response.content.decode())  # fmt: skip


def test_the_launch_flash_tells_the_event_once(client, cast):
    """'… launched', never a state that the live status would contradict a moment later;
    shown on the page the launch leads to, and on no later one."""
    client.force_login(cast.bob)
    response = client.post(reverse("run_new"), _form(cast), follow=True)
    run = Run.objects.get()
    assert response.redirect_chain == [(reverse("run_detail", args=[run.id]), 302)]
    [flash] = _flashes(response)
    assert flash.startswith("Run “first run” launched.") and "queued" not in flash.lower()
    Run.objects.filter(id=run.id).update(status=RunStatus.SUCCEEDED)
    for url in (reverse("run_detail", args=[run.id]), reverse("runs")):
        assert _flashes(client.get(url)) == [], url


def test_the_sweep_flash_tells_the_event_once(client, cast):
    from tests.webapp.test_compare import _sweep_form

    client.force_login(cast.bob)
    response = client.post(reverse("sweep_new"), _sweep_form(cast), follow=True)
    [flash] = _flashes(response)
    assert flash.startswith("Sweep “shoot-out” launched: 3 runs.") and "queued" not in flash
    assert _flashes(client.get(response.redirect_chain[-1][0])) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("r", 0), ("r", 100000), ("steps", 0), ("learning_rate", 5), ("dropout", 1.5)],
)
def test_launch_rejects_out_of_bounds(client, cast, field, value):
    client.force_login(cast.alice)
    response = client.post(reverse("run_new"), _form(cast, **{field: value}))
    assert response.status_code == 400
    errors = {**response.context["form"].errors, **response.context["method_form"].errors}
    assert field in errors
    assert not Run.objects.exists()


def test_method_fields_swap_in_for_the_chosen_method(client, cast):
    client.force_login(cast.alice)
    response = client.get(reverse("run_method_fields"), {"method": "lora"})
    page = response.content.decode()
    assert response.status_code == 200
    assert 'id="method-fields"' in page and 'name="r"' in page
    assert "<html" not in page  # a fragment, not a page


def test_launch_rejects_task_mismatch(client, cast):
    client.force_login(cast.alice)
    form = _form(cast, base_model="all-minilm-l6-v2")
    response = client.post(reverse("run_new"), form)
    assert "dataset" in response.context["form"].errors
    assert not Run.objects.exists()


def test_viewer_cannot_launch(client, cast):
    client.force_login(cast.carol)
    response = client.post(reverse("run_new"), _form(cast))
    assert "project" in response.context["form"].errors
    assert not Run.objects.exists()


def test_other_team_gets_404_everywhere(client, cast):
    run = _run(cast)
    upload = Dataset.objects.create(team=cast.acme, name="secret", task="seq-cls")
    client.force_login(cast.mallory)
    for url in [
        reverse("run_detail", args=[run.id]),
        reverse("run_live", args=[run.id]),
        reverse("run_adapter_download", args=[run.id]),
        reverse("dataset_detail", args=[upload.id]),
    ]:
        assert client.get(url).status_code == 404, url
    assert client.post(reverse("run_cancel", args=[run.id])).status_code == 404
    assert "lora-r8" not in client.get(reverse("runs")).content.decode()
    assert "secret" not in client.get(reverse("datasets")).content.decode()
    launch = client.post(reverse("run_new"), _form(cast))
    assert "project" in launch.context["form"].errors
    run.refresh_from_db()
    assert not run.cancel_requested


def test_live_partial_polls_until_finished(client, cast):
    run = _run(cast, status=RunStatus.RUNNING, step=2)
    client.force_login(cast.alice)
    url = reverse("run_live", args=[run.id])
    running = client.get(url)
    assert running.status_code == 200
    assert 'hx-trigger="every 2s"' in running.content.decode()
    Run.objects.filter(id=run.id).update(status=RunStatus.SUCCEEDED)
    finished = client.get(url)
    assert finished.status_code == 286
    assert "hx-trigger" not in finished.content.decode()


def test_the_live_panel_estimates_before_it_tells_a_time_left(client, cast):
    run = _run(cast, total_steps=100)
    fence = leases.run_claim(run_id=run.id, worker="w")
    client.force_login(cast.alice)
    url = reverse("run_live", args=[run.id])

    def steps(elapsed: dict[int, float]) -> str:
        points = [metrics.Point("elapsed", s, t, 1000.0 + t) for s, t in elapsed.items()]
        metrics.metrics_record(run_id=run.id, fence=fence, points=points)
        leases.run_heartbeat(run_id=run.id, fence=fence, step=max(elapsed))
        return " ".join(client.get(url).content.decode().split())

    assert "loading the model" in " ".join(client.get(url).content.decode().split())
    early = steps({1: 3.0, 2: 3.5})  # a slow first step, then two
    assert "estimating the time left…" in early and " left" not in early.replace("time left", "")
    assert "about 40 s left" in steps({s: 2.5 + 0.5 * s for s in range(3, 21)})  # 80 × 0.5 s
    assert "about 2 min left" in steps({s: 12.5 + 2.0 * (s - 20) for s in range(21, 41)})
    assert "measuring the adapter" in steps({100: 300.0})


def test_run_page_shows_curve_data_and_escapes_names(client, cast):
    run = _run(cast, name="<img src=x onerror=alert(1)>")
    fence = leases.run_claim(run_id=run.id, worker="w")
    metrics.metrics_record(
        run_id=run.id, fence=fence, points=[metrics.Point("train_loss", 1, 2.5, 0.0)]
    )
    client.force_login(cast.bob)
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert '"train_loss": {"step": [1], "value": [2.5]}' in page
    assert "plotly/plotly.min.js" in page


def test_cancel_queued_run_is_immediate(client, cast):
    run = _run(cast)
    client.force_login(cast.bob)
    response = client.post(reverse("run_cancel", args=[run.id]), follow=True)
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert _flashes(response) == ["Run “lora-r8” cancelled."]  # not "stops within one step"


def test_cancel_running_run_sets_the_flag(client, cast):
    run = _run(cast, status=RunStatus.RUNNING)
    client.force_login(cast.alice)
    response = client.post(reverse("run_cancel", args=[run.id]), follow=True)
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING and run.cancel_requested
    assert _flashes(response) == ["Cancel requested: the run stops within one training step."]


def test_viewer_cannot_cancel(client, cast):
    run = _run(cast, status=RunStatus.RUNNING)
    client.force_login(cast.carol)
    client.post(reverse("run_cancel", args=[run.id]))
    run.refresh_from_db()
    assert not run.cancel_requested


def test_adapter_zip_streams_every_chunk(client, cast, monkeypatch):
    monkeypatch.setattr(artifacts, "CHUNK_BYTES", 1000)
    run = _run(cast)
    fence = leases.run_claim(run_id=run.id, worker="w")
    weights = bytes(range(256)) * 20  # 5 120 bytes: six chunks
    config = json.dumps({"peft_type": "LORA"}).encode()
    leases.artifact_store(
        run_id=run.id, fence=fence, kind="adapter", name="adapter_model.safetensors", data=weights
    )
    leases.artifact_store(
        run_id=run.id, fence=fence, kind="adapter", name="adapter_config.json", data=config
    )
    assert run.artifacts.get(name="adapter_model.safetensors").chunks.count() == 6
    client.force_login(cast.bob)
    response = client.get(reverse("run_adapter_download", args=[run.id]))
    assert response.status_code == 200
    assert response["Content-Disposition"].startswith("attachment;")
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    assert sorted(archive.namelist()) == [
        "README.md",  # the model card
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert archive.read("adapter_model.safetensors") == weights
    assert archive.read("adapter_config.json") == config


def test_download_without_adapter_is_404(client, cast):
    run = _run(cast)
    client.force_login(cast.alice)
    assert client.get(reverse("run_adapter_download", args=[run.id])).status_code == 404


def test_bootstrap_prints_a_random_password_once(capsys):
    call_command("bootstrap_demo")
    first = capsys.readouterr().out
    call_command("bootstrap_demo")
    second = capsys.readouterr().out
    password = first.split("password: ")[1].split()[0]
    assert len(password) >= 16
    assert password not in second and "exists" in second
    from django.contrib.auth import authenticate
    from django.test import RequestFactory

    # Logins are rate limited per request (django-axes): authenticate needs the request.
    request = RequestFactory().post("/login/")
    assert authenticate(request, username="demo", password=password) is not None
