"""Every page of a free-form run trained elsewhere, through the real views: one with method
"full", no dataset and nested configs, one with a method PEFT Lab does not know. The pages
show what the runs say and "—" for the rest; what PEFT Lab cannot do with them (clone, the
playground, a merged model) is refused with the reason."""

import csv
import io

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from webapp.experiments import services
from webapp.experiments.external import run_file_upload
from webapp.experiments.models import MetricPoint, RunStatus

pytestmark = pytest.mark.django_db

NESTED = {"peft": {"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}, "seed": 3}


@pytest.fixture(autouse=True)
def _own_store(settings, tmp_path):
    backend = {"BACKEND": "webapp.experiments.store.WriteOnceFileStorage"}
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {**backend, "OPTIONS": {"location": str(tmp_path / "artifacts")}},
    }


@pytest.fixture
def runs(cast, make_run):
    """A finished "full" run with no dataset (its script reported a summary, sizes, points and
    a file), a running one with an unknown method, and a launched LoRA run beside them."""
    full = services.run_create_external(
        user=cast.bob,
        project=cast.acme_project,
        name="full-ft-on-cluster",
        base_model="meta-llama/Llama-3.1-8B",
        method="full",
        method_config={},
        train_config=NESTED | {"max_steps": 3},
        tags=["cluster"],
        profile={"trainable_params": 8000, "total_params": 8000},
    )
    MetricPoint.objects.bulk_create(
        MetricPoint(run=full, key="train_loss", step=s, value=2.0 / s, wall_time=s)
        for s in (1, 2, 3)
    )
    upload = io.BytesIO(b"{}")
    upload.name, upload.size = "trainer_state.json", 2
    run_file_upload(user=cast.bob, run=full, upload=upload)
    full = services.run_finish_external(
        user=cast.bob, run=full, status=RunStatus.SUCCEEDED, summary={"eval_loss": 0.75}
    )
    galore = services.run_create_external(
        user=cast.bob,
        project=cast.acme_project,
        name="galore-try",
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
        method="galore",
        method_config={"rank": 128, "update_proj_gap": 200},
        train_config={},
    )
    launched = make_run(
        status=RunStatus.SUCCEEDED,
        summary={"eval_loss": 1.0},
        profile={"trainable_params": 100, "total_params": 1000, "adapter_bytes": 4096},
    )
    return full, galore, launched


def _page(client, url: str, status: int = 200) -> str:
    response = client.get(url)
    assert response.status_code == status, (url, response.status_code)
    return response.content.decode()


def test_the_run_pages_show_what_they_know(cast, client, runs):
    full, galore, _ = runs
    client.force_login(cast.bob)
    page = _page(client, reverse("run_detail", args=[full.id]))
    assert "meta-llama/Llama-3.1-8B" in page and "(as named by its script)" in page
    assert "none of PEFT Lab" in page  # the dataset
    assert "<dd>Full fine-tuning</dd>" in page  # a method of PEFT Lab's, trained elsewhere
    assert "peft.lora.r" in page and "peft.lora.target_modules" in page
    assert "8,000 (100.000% of 8,000)" in page and "Adapter size</th><td>—" in page
    assert "trainer_state.json" in page  # the uploaded file
    assert "Clone run</a>" not in page
    assert "Try in the playground" not in page and "Download adapter" not in page
    live = client.get(reverse("run_live", args=[full.id]))
    assert live.status_code == 286  # finished: htmx stops polling
    page = _page(client, reverse("run_detail", args=[galore.id]))
    assert "galore" in page and "(trained elsewhere)" in page and "update_proj_gap" in page
    assert "not one of PEFT Lab&#x27;s methods" in page
    assert "sample-instructions" in page and "its script sends the metrics" in page
    assert "Step 0 of —" in page
    assert _page(client, reverse("run_live", args=[galore.id]))


def test_the_list_compare_and_csv_show_dashes(cast, client, runs):
    full, galore, launched = runs
    client.force_login(cast.bob)
    listing = _page(client, reverse("runs"))
    assert "full-ft-on-cluster" in listing and "galore-try" in listing
    ids = f"runs={full.id}&runs={galore.id}&runs={launched.id}"
    compare = _page(client, f"{reverse('compare')}?{ids}")
    assert "peft.lora.r" in compare  # a nested setting is its own column
    tradeoff = compare.split('class="table tradeoff"')[1].split("</table>")[0]
    rows = tradeoff.split("<tr>")[2:]
    assert "8,000" in rows[0] and "—" in rows[0]  # no adapter size, no latency
    assert rows[1].count("—") >= 5  # galore reported nothing
    assert "4.0\xa0KB" in rows[2]
    sheet = _page(client, f"{reverse('compare_csv')}?{ids}")
    table = list(csv.DictReader(io.StringIO(sheet)))
    assert [(r["run"], r["trainable_params"], r["adapter_bytes"]) for r in table] == [
        ("full-ft-on-cluster", "8000", ""),
        ("galore-try", "", ""),
        ("lora-r8", "100", "4096"),
    ]
    assert table[0]["quality"] == "0.75"


def test_shared_pages_of_a_free_form_run(cast, client, runs):
    full, galore, _ = runs
    _, run_secret = services.share_link_create(user=cast.bob, team=cast.acme, scope="run", run=full)
    _, compare_secret = services.share_link_create(
        user=cast.bob, team=cast.acme, scope="compare", run_ids=[full.id, galore.id]
    )
    anonymous = client
    page = _page(anonymous, reverse("share_view", args=[run_secret]))
    assert "full-ft-on-cluster" in page and "none of PEFT Lab" in page
    assert "trainer_state.json" not in page  # files are for members, through the API
    assert anonymous.get(reverse("share_live", args=[run_secret])).status_code == 286
    assert "This run has no adapter yet." in _page(
        anonymous, reverse("share_adapter", args=[run_secret]), status=404
    )
    compare = _page(anonymous, reverse("share_view", args=[compare_secret]))
    assert "galore-try" in compare and "peft.lora.r" in compare


def test_what_cannot_be_done_with_them_says_why(cast, client, runs):
    full, galore, _ = runs
    client.force_login(cast.bob)
    for run, reason in (
        (full, "It was trained elsewhere and names no PEFT Lab dataset"),
        (galore, "It was trained elsewhere with “galore”"),
    ):
        response = client.get(f"{reverse('run_new')}?clone={run.id}", follow=True)
        assert response.redirect_chain[-1][0] == reverse("run_detail", args=[run.id])
        assert f"This run cannot be cloned. {reason}" in (
            response.content.decode().replace("&#x201c;", "“").replace("&#x201d;", "”")
        )
    assert "no adapter yet" in _page(client, reverse("run_adapter_download", args=[full.id]), 404)
    assert _page(client, reverse("run_merged_download", args=[full.id]), 404)
    api = APIClient()
    api.force_authenticate(cast.bob)
    ask = api.post(reverse("api-playground"), {"runs": [full.id], "text": "hi"}, format="json")
    assert ask.status_code == 400 and "names no dataset" in ask.json()["detail"]
    data = api.get(reverse("api-run", args=[full.id])).json()
    assert (data["dataset"], data["method"], data["train_config"]["peft"]) == (
        None,
        "full",
        NESTED["peft"],
    )
    listed = api.get(reverse("api-runs"), {"method": "galore"}).json()["results"]
    assert [r["name"] for r in listed] == ["galore-try"]


def test_a_run_with_a_trainers_hundred_settings_folds_all_but_the_first(cast, client):
    """A Trainer's to_sanitized_dict() has 100+ keys: the page lists 16 and folds the rest."""
    arguments = {f"argument_{index:03d}": index for index in range(40)}
    run = services.run_create_external(
        user=cast.bob,
        project=cast.acme_project,
        name="trainer",
        base_model="gpt2",
        method="lora",
        method_config={},
        train_config=arguments,
    )
    client.force_login(cast.bob)
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    folded = page.split('<details class="more-settings">')
    assert len(folded) == 2 and "24 more settings" in folded[1]
    assert "argument_015" in folded[0] and "argument_016" not in folded[0]
    assert "argument_039" in folded[1]


def test_an_external_run_of_a_known_method_with_settings_it_refuses_is_not_cloned(cast):
    from webapp.experiments.models import Run
    from webapp.experiments.views import clone_refusal

    dataset = cast.datasets["sample-instructions"]
    run = Run(external=True, method="full", base_model="tiny-llama", dataset=dataset,
              method_config={"peft": {"lora": {"r": 8}}})  # fmt: skip
    assert "full settings PEFT Lab refuses" in clone_refusal(run)
    run.method_config = {}
    assert clone_refusal(run) == ""
