"""A team brings its own model, in Chromium against a real Celery worker: an admin registers
a Qwen2 directory under the allowed root from the page, the worker inspects it and the page
turns ready by itself, listing its layers and where each method goes; then a sweep of every
method launched from the model's page trains on it to the end, and the LoRA, DoRA, (IA)³,
prompt and prefix adapters load in HF PEFT with our logits (≤ 1e-4), and the compare page
shows full fine-tuning as the reference row beside the Pareto front. The model page is
saved as model.png (PEFTLAB_SCREENSHOTS=docs/screenshots refreshes the README's)."""

import re

import pytest

from peft_core.methods import METHOD_LIST
from tests.e2e.test_first_hour import SCREENSHOTS, _wait_for
from webapp.experiments.models import Run, RunStatus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

TRAIN = {"steps": "4", "batch_size": "2", "max_length": "48", "eval_every": "0"}
INSPECT_S, SWEEP_S = 90, 240


def test_register_a_qwen_and_sweep_every_method_on_it(
    watched, live_server, cast, start_worker, model_root, settings, monkeypatch, tmp_path
):
    page, base = watched, live_server.url
    settings.MODEL_ROOTS = [model_root]
    monkeypatch.setenv("PEFTLAB_MODEL_ROOTS", str(model_root))  # the worker's settings
    worker = start_worker()

    page.goto(f"{base}/login/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", "alice-pw-9")
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/")

    page.click("nav >> text=Models")
    page.click("text=Register a model")
    page.fill("#id_name", "my-qwen")
    page.fill("#id_title", "Our tiny Qwen2")
    page.fill("#id_path", "my-qwen")
    page.click("text=Register and inspect")
    page.wait_for_url(re.compile(r"/models/\d+/$"))
    _wait_for(
        lambda: page.locator("#model-status .status-ready").count() == 1,
        "the model was not inspected",
        worker,
        INSPECT_S,
    )
    page.reload()  # the tables come with the full page
    text = page.locator("main").inner_text()
    assert "Qwen2ForCausalLM" in text and "Qwen2ForSequenceClassification" in text
    assert "model.layers.<i>.self_attn.q_proj" in text and "model.layers.<i>.mlp.down_proj" in text
    assert "Cannot apply" not in text
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    page.screenshot(path=SCREENSHOTS / "model.png", full_page=True)

    page.click("text=Sweep on it")
    page.wait_for_url(re.compile(r"/sweeps/new/\?base_model=my-qwen"))
    assert page.locator("#id_base_model").input_value() == "my-qwen"
    for box in page.locator("input[name=methods]").all():
        box.check()
    page.fill("#id_name", "every method on my-qwen")
    page.select_option("#id_dataset", str(cast.datasets["sample-instructions"].id))
    for field, value in TRAIN.items():
        page.fill(f"#id_{field}", value)
    page.click("text=Launch sweep")
    page.wait_for_url(re.compile(r"/sweeps/\d+/$"))
    assert page.locator("#sweep-runs tbody tr").count() == len(METHOD_LIST)
    _wait_for(
        lambda: page.locator("#sweep-runs >> text=Succeeded").count() == len(METHOD_LIST),
        "the sweep did not succeed",
        worker,
        SWEEP_S,
    )
    runs = Run.objects.filter(sweep__name="every method on my-qwen")
    assert {run.status for run in runs} == {RunStatus.SUCCEEDED}
    assert {run.method for run in runs} == {entry.key for entry in METHOD_LIST}
    _hf_peft_loads_the_adapters(runs, model_root / "my-qwen", tmp_path)

    # The compare page: full fine-tuning is the reference row (every weight, nothing to
    # merge, the whole model stored), the Pareto front and the recommendation line.
    page.click("text=Compare these runs")
    page.wait_for_url(re.compile(r"/compare/\?sweep=\d+"))
    assert page.locator("#recommendation").inner_text().startswith("Best at each size:")
    assert page.locator("table.tradeoff .badge.pareto").count() >= 1
    full = page.locator("table.tradeoff tbody tr", has=page.locator("td:text-is('full')"))
    assert "100.000%" in full.inner_text() and "(whole model)" in full.inner_text()
    assert full.locator("td").nth(4).inner_text() == "n/a"  # mergeable: nothing to merge
    assert page.problems == []


HF_METHODS = ("lora", "dora", "ia3", "prompt", "prefix")  # those HF PEFT has


def _hf_peft_loads_the_adapters(runs, model_dir, tmp_path) -> None:
    """Each adapter HF PEFT knows loads in PeftModel.from_pretrained with our logits."""
    import torch
    from peft import PeftModel

    import peft_core
    from peft_core.pretrained import load_directory
    from webapp.experiments.artifacts import artifact_files

    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    for run in runs.filter(method__in=HF_METHODS):
        directory = tmp_path / run.method
        directory.mkdir()
        for name, data in artifact_files(run_id=run.id, kind="adapter").items():
            (directory / name).write_bytes(data)
        ours = peft_core.load_adapter(load_directory(model_dir, "causal-lm")[0], directory)
        theirs = PeftModel.from_pretrained(load_directory(model_dir, "causal-lm")[0], directory)
        with torch.no_grad():
            mine = ours.eval()(input_ids=ids).logits
            hf = theirs.eval()(input_ids=ids).logits[:, -ids.shape[1] :]  # prompt: no virtual
        assert (mine - hf).abs().max() <= 1e-4, run.method
