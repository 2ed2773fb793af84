"""The launch form's estimate panel shows the pre-flight's peak memory against a worker's
memory (PEFTLAB_WORKER_MEMORY_GIB, else this machine's), and warns before launch when the
run would be refused, with what would fit."""

import psutil
import pytest
from django.test import Client

from peft_core.preflight import estimate_for_run
from peft_core.registry import build_config
from peft_core.tiny import tiny_config
from peft_core.train import TrainConfig
from tests.webapp.test_estimates import URL, _form
from webapp.experiments import estimates

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _empty_model_cache(settings, tmp_path):
    settings.MODEL_CACHE_DIR = tmp_path / "cache"


def _panel(cast, **overrides) -> str:
    client = Client()
    client.force_login(cast.alice)
    response = client.get(URL, _form(cast, **overrides))
    assert response.status_code == 200
    return response.content.decode()


def test_the_panel_shows_the_peak_against_this_machines_memory(cast, settings):
    settings.WORKER_MEMORY_GIB = 0
    body = _panel(cast)
    assert "Peak memory" in body and "this server's total memory" in body
    assert "would not fit" not in body
    method_form = estimates.METHOD_FORMS["lora"](_form(cast))
    assert method_form.is_valid()
    lora = build_config("lora", method_form.config_kwargs())
    train = TrainConfig(steps=30, batch_size=4, learning_rate=0.001, max_length=128, eval_every=10)
    peak = estimate_for_run(tiny_config("llama"), train, lora, "cpu").peak
    assert estimates.worker_memory_bytes() == psutil.virtual_memory().total
    from django.template.defaultfilters import filesizeformat

    assert f"≈ {filesizeformat(peak)}" in body


def test_the_workers_memory_is_the_setting_when_set(settings):
    settings.WORKER_MEMORY_GIB = 24
    assert estimates.worker_memory_bytes() == 24 * 2**30


def test_a_run_beyond_the_workers_memory_is_warned_about_before_launch(cast, settings, monkeypatch):
    """A worker of 300 MiB (below the setting's 1 GiB step, too much for a tiny model):
    batch 256 with eager attention needs more."""
    settings.WORKER_MEMORY_GIB = 1
    monkeypatch.setattr(estimates, "worker_memory_bytes", lambda: 300 * 2**20)
    body = _panel(cast, batch_size=256, max_length=128, attn="eager")
    assert "PEFTLAB_WORKER_MEMORY_GIB" in body
    assert "would not fit in a worker's memory and would be refused: needs ~" in body
    # eager attention's score matrices, not the kept activations, are what overflows: the
    # least change is a smaller micro-batch at the same effective batch
    advice = body.split("0.3 GiB free: try ")[1].split("</p>")[0].split(", or ")
    assert advice[0].startswith("--grad-accum 4 with batch 64 (~")
    assert all(not words.startswith("--grad-accum") for words in advice[1:])
