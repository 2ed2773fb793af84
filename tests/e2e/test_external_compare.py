"""In the browser (issue 17's acceptance): a run a user trained elsewhere, with TRL's
SFTTrainer and PeftLabCallback, sits in the compare page's trade-off table beside runs PEFT
Lab launched: its method, trainable parameters (from its PEFT config), quality and adapter
size are there, what it cannot know reads "—", and nothing on the page fails."""

import os

import pytest

from peftlab.client import Client
from tests.e2e.conftest import log_in
from tests.e2e.test_first_hour import SCREENSHOTS
from tests.peftlab.test_tracking_live import ROOT, SFT_SCRIPT, _run, _script
from webapp.accounts.services import api_token_create
from webapp.experiments.models import Run, RunStatus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _launched(make_run, method: str, trainable: int, eval_loss: float) -> Run:
    total = 1_000_000
    return make_run(
        name=f"launched {method}",
        method=method,
        status=RunStatus.SUCCEEDED,
        summary={"eval_loss": eval_loss, "base_eval_loss": 6.3},
        profile={
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100 * trainable / total,
            "adapter_bytes": 4 * trainable,
            "base_ms": 10.0,
            "adapter_ms": 11.0,
            "overhead": 1.1,
            "overhead_spread": 0.02,
            "mergeable": True,
            "wall_s": 30.0,
            "train_s": 25.0,
            "tokens_per_s": 900.0,
            "peak_memory_mb": 120.0,
            "memory_kind": "heap",
        },
    )


def test_an_external_trl_run_sits_beside_launched_runs_in_the_trade_off_table(
    page, live_server, tmp_path, make_run, cast
):
    launched = [_launched(make_run, "lora", 1_792, 6.1), _launched(make_run, "ia3", 96, 6.2)]
    token = api_token_create(user=cast.alice, name="script")[1]
    env = {  # a user's shell: the server and token in the environment
        **os.environ,
        "PEFTLAB_URL": live_server.url,
        "PEFTLAB_TOKEN": token,
        "PEFTLAB_CONFIG": str(tmp_path / "no-login.json"),
        "PEFTLAB_SPOOL_DIR": str(tmp_path / "spool"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    with Client(live_server.url, token) as api:
        external = api.run(_run(_script(tmp_path, SFT_SCRIPT), env)["run"])
    assert external["status"] == "succeeded" and external["external"]

    problems = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    log_in(page, live_server, "alice", "alice-pw-9")
    ids = "&".join(f"runs={run_id}" for run_id in [*(r.id for r in launched), external["id"]])
    page.goto(f"{live_server.url}/compare/?{ids}")
    page.wait_for_selector("table.tradeoff")
    rows = page.locator("table.tradeoff tbody tr")
    assert rows.count() == 3
    row = rows.filter(has_text="sft")
    assert row.count() == 1
    text = row.inner_text()
    trainable = external["profile"]["trainable_params"]
    assert f"{trainable:,}" in text  # from its PEFT config, counted by the callback
    assert "lora" in text.lower()
    assert "—" in text  # latency and memory were not measured here
    page.wait_for_selector("#scatter .main-svg")
    assert page.locator("#scatter .scatterlayer .trace").count() == 3  # the external one too
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)  # the README's, with PEFTLAB_SCREENSHOTS
    page.screenshot(path=SCREENSHOTS / "external-compare.png", full_page=True)
    page.goto(f"{live_server.url}/runs/{external['id']}/")
    page.wait_for_selector("#loss-chart .main-svg")
    page.screenshot(path=SCREENSHOTS / "external-run.png", full_page=True)
    # It names no dataset: no merged model is offered (the API says why, 404)
    assert page.locator("text=Build merged model").count() == 0
    assert page.locator("text=Download adapter").count() == 1
    assert problems == []
