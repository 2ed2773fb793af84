"""A sweep that repeats each configuration over k seeds (issue 18, item 2): the form, the API,
the bounds, the quota (every seed is a run) and the clone."""

from collections import Counter

import pytest
from django.urls import reverse

from webapp.experiments.confidence import replicate_key
from webapp.experiments.models import Run, Sweep

pytestmark = pytest.mark.django_db


def _form(cast, **fields) -> dict:
    data = {
        "name": "seeded",
        "project": cast.acme_project.id,
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "methods": ["lora", "ia3"],
        "grid": "lora.r = 4, 8",
        "steps": 5,
        "batch_size": 2,
        "learning_rate": 1e-3,
        "max_length": 64,
        "eval_every": 0,
        "seed": 40,
        "seeds": 3,
    }
    return data | fields


def _assert_k_seeds_per_configuration(runs: list[Run], k: int, configurations: int) -> None:
    groups = Counter(replicate_key(run) for run in runs)
    assert len(groups) == configurations and set(groups.values()) == {k}
    for key in groups:
        seeds = [run.train_config["seed"] for run in runs if replicate_key(run) == key]
        assert seeds == [40, 41, 42]  # base seed + i, distinct


def test_the_form_launches_k_runs_per_configuration(client, cast):
    client.force_login(cast.bob)
    response = client.post(reverse("sweep_new"), _form(cast))
    assert response.status_code == 302
    sweep = Sweep.objects.get()
    runs = list(sweep.runs.order_by("id"))
    assert len(runs) == 9  # (lora r=4, lora r=8, ia3) × 3 seeds
    _assert_k_seeds_per_configuration(runs, 3, 3)
    assert runs[0].name == "seeded · lora r=4 · seed 40"
    assert sweep.grid["seeds"] == 3
    page = client.get(reverse("sweep_detail", args=[sweep.id])).content.decode()
    assert "each configuration over 3 seeds" in page
    form = client.get(reverse("sweep_new"), {"clone": sweep.id}).context["form"]
    assert form.initial["seeds"] == 3


def test_one_seed_is_the_sweep_as_before(client, cast):
    client.force_login(cast.bob)
    client.post(reverse("sweep_new"), _form(cast, seeds="", methods=["ia3"], grid=""))
    (run,) = Sweep.objects.get().runs.all()
    assert run.name == "seeded · ia3" and run.train_config["seed"] == 40


@pytest.mark.parametrize("seeds", [0, 11, -1])
def test_seeds_are_bounded(client, cast, seeds):
    client.force_login(cast.bob)
    response = client.post(reverse("sweep_new"), _form(cast, seeds=seeds))
    assert response.status_code == 400
    assert "seeds" in response.context["form"].errors
    assert not Run.objects.exists()


def test_seeds_and_a_seed_grid_are_not_both_given(client, cast):
    client.force_login(cast.bob)
    response = client.post(reverse("sweep_new"), _form(cast, grid="train.seed = 1, 2"))
    assert response.status_code == 400
    assert "train.seed is listed in the grid" in str(response.context["form"].errors["grid"])
    assert not Run.objects.exists()


def test_the_run_cap_counts_every_seed(client, cast):
    client.force_login(cast.bob)
    # 2 methods × 4 ranks × 10 seeds = 80 runs > 64
    grid = "lora.r = 2, 4, 8, 16\ndora.r = 2, 4, 8, 16"
    data = _form(cast, grid=grid, methods=["lora", "dora"], seeds=10)
    response = client.post(reverse("sweep_new"), data)
    assert response.status_code == 400
    assert "80 runs: a sweep holds at most 64" in str(response.context["form"].errors["grid"])


def test_the_last_seed_must_be_a_valid_seed(client, cast):
    client.force_login(cast.bob)
    response = client.post(reverse("sweep_new"), _form(cast, seed=2**32 - 2))
    assert response.status_code == 400
    assert "Seeds 4294967294 to 4294967296" in str(response.context["form"].errors["grid"])


def test_the_queue_quota_counts_the_runs_of_every_seed(client, cast, settings):
    settings.TEAM_MAX_QUEUED = 8  # 9 runs asked
    client.force_login(cast.bob)
    response = client.post(reverse("sweep_new"), _form(cast))
    assert response.status_code == 429
    assert "this launch adds 9" in response.content.decode()
    assert not Run.objects.exists() and not Sweep.objects.exists()
