"""The model registry through the web and the API: an admin registers a directory under an
allowed root or a Hub id from the HF cache; a refusal is a 400 with the reason and nothing is
stored or queued; members see their teams' models, and another team's is 404."""

import pytest
from django.urls import reverse

from webapp.experiments import queue
from webapp.registry.models import BaseModel, ModelSource, ModelStatus

pytestmark = pytest.mark.django_db


def _register(client, user, team, **fields):
    client.force_login(user)
    data = {"team": team.id, "name": "my-qwen", "title": "", "path": "", "hub": ""} | fields
    return client.post(reverse("model_register"), data)


def test_an_admin_registers_a_directory_and_a_worker_is_asked_to_inspect_it(
    cast, client, allowed_root, published, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = _register(client, cast.alice, cast.acme, path="my-qwen")
    model = BaseModel.objects.get(team=cast.acme, name="my-qwen")
    assert response.status_code == 302 and response.url == f"/models/{model.id}/"
    assert model.source == ModelSource.LOCAL and model.status == ModelStatus.INSPECTING
    assert model.location == str((allowed_root / "my-qwen").resolve())
    assert len(model.content_sha256) == 64
    assert published == [(queue.MODEL_INSPECT, (model.id,))]
    page = client.get(reverse("model_detail", args=[model.id]))
    assert b"A worker is building the model" in page.content


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/etc", b"outside the allowed model roots"),
        ("../x", b"outside the allowed model roots"),
        ("absent", b"is not a directory"),
    ],
)
def test_a_refused_directory_is_a_400_with_the_reason_and_nothing_is_stored(
    cast, client, allowed_root, published, path, reason
):
    response = _register(client, cast.alice, cast.acme, path=path)
    assert response.status_code == 400 and reason in response.content
    assert not BaseModel.objects.filter(team=cast.acme).exists() and published == []


def test_a_member_cannot_register_and_another_team_cannot_see(cast, client, allowed_root):
    client.force_login(cast.bob)
    assert b"Register a model" not in client.get(reverse("models")).content
    response = _register(client, cast.bob, cast.acme, path="my-qwen")
    assert response.status_code == 400  # Acme is not among the teams bob administers
    assert not BaseModel.objects.filter(team=cast.acme).exists()
    _register(client, cast.alice, cast.acme, path="my-qwen")
    model = BaseModel.objects.get(team=cast.acme)
    client.force_login(cast.mallory)
    assert client.get(reverse("model_detail", args=[model.id])).status_code == 404
    listed = client.get(reverse("models")).content.decode()
    assert reverse("model_detail", args=[model.id]) not in listed
    client.force_login(cast.carol)  # a viewer of Acme sees it
    assert client.get(reverse("model_detail", args=[model.id])).status_code == 200


def test_names_are_checked(cast, client, allowed_root):
    for name, reason in [
        ("tiny-llama", b"a bundled model&#x27;s name"),
        ("Bad Name", b"lower-case letters"),
    ]:
        response = _register(client, cast.alice, cast.acme, path="my-qwen", name=name)
        assert response.status_code == 400 and reason in response.content, name
    assert _register(client, cast.alice, cast.acme, path="my-qwen").status_code == 302
    again = _register(client, cast.alice, cast.acme, path="my-qwen")
    assert again.status_code == 400 and b"already has a model named my-qwen" in again.content


def test_the_command_registers_for_a_team(cast, allowed_root, published):
    from io import StringIO

    from django.core.management import call_command
    from django.core.management.base import CommandError

    out = StringIO()
    call_command("model_add", team="Acme", name="my-qwen", path="my-qwen", stdout=out)
    assert "registered my-qwen" in out.getvalue()
    assert BaseModel.objects.get(team=cast.acme, name="my-qwen").status == ModelStatus.INSPECTING
    with pytest.raises(CommandError, match="outside the allowed model roots"):
        call_command("model_add", team="Acme", name="etc", path="/etc")
    with pytest.raises(CommandError, match="no team named"):
        call_command("model_add", team="Nobody", name="x", path="my-qwen")


def _ready_qwen(cast, root) -> BaseModel:
    from peft_core.sources import model_files

    directory = (root / "my-qwen").resolve()
    return BaseModel.objects.create(
        team=cast.acme, name="my-qwen", source=ModelSource.LOCAL, location=str(directory),
        content_sha256=model_files(directory).content_sha256, status=ModelStatus.READY,
        tasks=["causal-lm", "seq-cls"],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("targets", "modules", "per_layer_in_out"),
    [
        ("default", ["model.layers.<i>.self_attn.q_proj", "model.layers.<i>.self_attn.v_proj"],
         [(64, 64), (64, 32)]),
        ("q_proj, k_proj", ["model.layers.<i>.self_attn.q_proj",
                            "model.layers.<i>.self_attn.k_proj"], [(64, 64), (64, 32)]),
        (r"model\.layers\.\d+\.mlp\.(up|down)_proj", ["model.layers.<i>.mlp.up_proj",
                                                      "model.layers.<i>.mlp.down_proj"],
         [(64, 128), (128, 64)]),
    ],
)  # fmt: skip
def test_the_launch_form_previews_the_matched_modules_and_the_exact_count(
    cast, client, allowed_root, targets, modules, per_layer_in_out
):
    from webapp.experiments.method_forms import method_defaults

    _ready_qwen(cast, allowed_root)
    client.force_login(cast.bob)
    data = {
        "name": "x", "project": cast.acme_project.id, "base_model": "my-qwen",
        "dataset": cast.datasets["sample-instructions"].id, "method": "lora", "steps": 30,
        "batch_size": 4, "learning_rate": 0.001, "max_length": 128, "eval_every": 10,
    } | method_defaults("lora") | {"target_modules": targets, "r": 8}  # fmt: skip
    page = client.get(reverse("run_estimate"), data).content.decode()
    expected = 2 * sum(8 * (d_in + d_out) for d_in, d_out in per_layer_in_out)  # 2 layers
    assert f"<strong>{expected:,}</strong>" in page, page
    assert "Adapted modules" in page and "<strong>4</strong>" in page
    for pattern in modules:
        assert f"<code>{pattern.replace('<', '&lt;').replace('>', '&gt;')}</code>" in page


def test_a_pattern_that_matches_nothing_is_named_before_launch(cast, client, allowed_root):
    from webapp.experiments.method_forms import method_defaults

    _ready_qwen(cast, allowed_root)
    client.force_login(cast.bob)
    data = {
        "name": "x", "project": cast.acme_project.id, "base_model": "my-qwen",
        "dataset": cast.datasets["sample-instructions"].id, "method": "lora", "steps": 30,
        "batch_size": 4, "learning_rate": 0.001, "max_length": 128, "eval_every": 10,
    } | method_defaults("lora") | {"target_modules": "query, value"}  # fmt: skip
    page = client.get(reverse("run_estimate"), data).content.decode()
    assert "This would fail on the model" in page and "matched no Linear" in page
    assert "q_proj" in page  # the names it has


def test_an_invalid_regex_is_refused_before_launch(cast, client, allowed_root):
    _ready_qwen(cast, allowed_root)
    client.force_login(cast.bob)
    form = {
        "name": "x", "project": cast.acme_project.id, "base_model": "my-qwen",
        "dataset": cast.datasets["sample-instructions"].id, "method": "lora", "steps": 2,
        "batch_size": 2, "learning_rate": 0.001, "max_length": 64, "eval_every": 0,
        "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "[unclosed",
    }  # fmt: skip
    response = client.post(reverse("run_new"), form)
    assert response.status_code == 400 and b"is not a valid regex" in response.content


def test_the_dataset_page_shows_one_row_as_the_model_tokenises_it(cast, client, allowed_root):
    """The prompt's tokens are grey (not in the loss), the completion's learned; a model with
    a chat template renders the row with it."""
    import re

    from peft_core.samples import sample_rows

    _ready_qwen(cast, allowed_root)
    dataset = cast.datasets["sample-instructions"]
    client.force_login(cast.carol)
    page = client.get(reverse("dataset_detail", args=[dataset.id])).content.decode()
    assert 'value="my-qwen"' in page and "What a model learns from" in page
    row = sample_rows("sample-instructions")[0][0]
    for model, chat in (("tiny-llama", False), ("my-qwen", True)):
        url = reverse("dataset_tokens", args=[dataset.id])
        preview = client.get(url, {"model": model}).content.decode()
        learned = "".join(re.findall(r'<span class="token learned"[^>]*>(.*?)</span>', preview))
        read = "".join(re.findall(r'<span class="token"[^>]*>(.*?)</span>', preview))
        assert learned.startswith(row["completion"].replace("'", "&#x27;")), (model, learned)
        assert row["prompt"].replace("'", "&#x27;") in read
        assert ("&lt;|user|&gt;" in read) is chat and ("chat template" in preview) is chat
    other = client.get(reverse("dataset_tokens", args=[dataset.id]), {"model": "all-minilm-l6-v2"})
    assert b"Choose a ready model for causal lm" in other.content
