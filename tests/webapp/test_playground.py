"""The playground: a prompt through the base model and chosen adapters, answered by a worker
(in-process here), side by side on a page; votes on the best answer show on the compare page."""

import pytest
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from webapp.accounts.services import api_token_create
from webapp.experiments import services
from webapp.experiments.models import PlaygroundPrompt, PlaygroundVote, Run, RunStatus
from workers.playground import answer_prompt
from workers.training import execute_run

pytestmark = pytest.mark.django_db


def _api(user) -> APIClient:
    _, plain = api_token_create(user=user, name="t")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plain}")
    return client


def _trained(cast, name: str, **fields) -> Run:
    defaults = {
        "project": cast.acme_project,
        "name": name,
        "created_by": cast.alice,
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"],
        "method": "lora",
        "method_config": {"r": 4},
        "train_config": {"steps": 2, "batch_size": 2, "max_length": 32},
        "total_steps": 2,
    }
    run = Run.objects.create(**{**defaults, **fields})
    assert execute_run(run.id, worker="w1:1") == "succeeded"
    run.refresh_from_db()
    return run


@pytest.fixture
def two_runs(cast):
    return _trained(cast, "lora-a"), _trained(cast, "ia3-b", method="ia3", method_config={})


def test_a_prompt_is_answered_side_by_side_and_votes_show_on_compare(cast, two_runs):
    first, second = two_runs
    client = Client()
    client.force_login(cast.bob)
    page = client.get(reverse("playground") + f"?runs={first.id},{second.id}")
    assert page.status_code == 200
    assert page.content.decode().count("checked") == 2  # both pre-selected

    body = {"text": "Put in alphabetical order: pear, apple", "runs": [first.id, second.id]}
    response = client.post(reverse("playground"), body)
    prompt = PlaygroundPrompt.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("playground_prompt", args=[prompt.id])
    assert (prompt.status, prompt.team, prompt.base_model) == ("queued", cast.acme, "tiny-llama")
    waiting = client.get(response["Location"]).content.decode()
    assert "Waiting for a worker" in waiting and 'hx-trigger="every 1s"' in waiting

    assert answer_prompt(prompt.id) == "done"
    assert answer_prompt(prompt.id) == "skipped"  # a duplicate delivery
    prompt.refresh_from_db()
    assert set(prompt.answers) == {"base", str(first.id), str(second.id)}
    assert all(isinstance(a["text"], str) for a in prompt.answers.values())
    assert prompt.finished_at is not None and prompt.error == ""

    partial = client.get(response["Location"], headers={"HX-Request": "true"})
    assert partial.status_code == 286  # htmx: stop polling, the answers are in
    html = partial.content.decode()
    assert html.count("This one is best") == 3 and "lora-a" in html and "ia3-b" in html

    vote = client.post(reverse("playground_vote", args=[prompt.id]), {"choice": second.id})
    assert vote.status_code == 302
    client.post(reverse("playground_vote", args=[prompt.id]), {"choice": first.id})  # changed
    alice = Client()
    alice.force_login(cast.alice)
    alice.post(reverse("playground_vote", args=[prompt.id]), {"choice": "base"})
    votes = {(v.user.username, v.run_id) for v in PlaygroundVote.objects.all()}
    assert votes == {("bob", first.id), ("alice", None)}

    compare = client.get(reverse("compare") + f"?runs={first.id}&runs={second.id}")
    text = compare.content.decode()
    assert "Playground votes" in text
    assert f"{reverse('playground')}?runs={first.id},{second.id}" in text
    rows = text.split("Playground votes", 1)[1].split("</table>", 1)[0]
    assert "<td>lora-a</td><td>1</td><td>1</td>" in rows
    assert "<td>ia3-b</td><td>0</td><td>1</td>" in rows


def test_a_classifier_answers_with_its_labels(cast):
    run = _trained(
        cast,
        "sentiment",
        base_model="tiny-bert",
        dataset=cast.datasets["sample-sentiment"],
        method="ia3",
        method_config={},
    )
    prompt = services.playground_prompt_create(user=cast.bob, runs=[run], text="what a fine day")
    assert answer_prompt(prompt.id) == "done"
    prompt.refresh_from_db()
    answer = prompt.answers[str(run.id)]
    assert set(prompt.answers) == {str(run.id)}  # an untrained base head has no answer
    assert answer["label"] in run.dataset.label_names
    assert sum(answer["scores"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("   ", "Type a prompt"),
        ("x" * 2001, "at most 2000 characters"),
    ],
)
def test_bad_prompts_are_refused(cast, make_run, text, message):
    run = make_run(status=RunStatus.SUCCEEDED)
    with pytest.raises(services.ValidationError, match=message):
        services.playground_prompt_create(user=cast.bob, runs=[run], text=text)


def test_runs_must_be_succeeded_and_share_a_base_model(cast, make_run):
    done = make_run(status=RunStatus.SUCCEEDED)
    other_model = make_run(status=RunStatus.SUCCEEDED, base_model="tiny-gpt2")
    running = make_run(status=RunStatus.RUNNING)
    with pytest.raises(services.ValidationError, match="one base model"):
        services.playground_prompt_create(user=cast.bob, runs=[done, other_model], text="hi")
    with pytest.raises(services.ValidationError, match="succeeded"):
        services.playground_prompt_create(user=cast.bob, runs=[running], text="hi")
    with pytest.raises(services.ValidationError, match="between 1 and 4"):
        services.playground_prompt_create(user=cast.bob, runs=[done] * 5, text="hi")
    assert not PlaygroundPrompt.objects.exists()


def test_a_viewer_reads_answers_but_neither_asks_nor_votes(cast, make_run):
    run = make_run(status=RunStatus.SUCCEEDED)
    client = Client()
    client.force_login(cast.carol)
    response = client.post(reverse("playground"), {"text": "hi", "runs": [run.id]})
    assert response.status_code == 400 and not PlaygroundPrompt.objects.exists()
    prompt = PlaygroundPrompt.objects.create(
        team=cast.acme, base_model="tiny-llama", task="causal-lm", text="hi", status="done"
    )
    prompt.runs.set([run])
    page = client.get(reverse("playground_prompt", args=[prompt.id])).content.decode()
    assert "This one is best" not in page
    client.post(reverse("playground_vote", args=[prompt.id]), {"choice": "base"})
    assert not PlaygroundVote.objects.exists()


def test_another_teams_runs_cannot_be_asked(cast, make_run):
    run = make_run(status=RunStatus.SUCCEEDED)
    client = Client()
    client.force_login(cast.mallory)
    response = client.post(reverse("playground"), {"text": "hi", "runs": [run.id]})
    assert response.status_code == 400 and "Select a valid choice" in response.content.decode()
    assert not PlaygroundPrompt.objects.exists()


def test_with_no_finished_run_the_page_says_what_to_do(cast):
    client = Client()
    client.force_login(cast.bob)
    page = client.get(reverse("playground")).content.decode()
    assert "No run has finished yet" in page and reverse("run_new") in page


def test_the_api_asks_and_reads_like_the_page(cast, make_run):
    run = make_run(status=RunStatus.SUCCEEDED)
    bob = _api(cast.bob)
    response = bob.post(reverse("api-playground"), {"runs": [run.id], "text": "hi"}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["status"], body["runs"], body["answers"]) == ("queued", [run.id], {})
    assert body["url"].endswith(reverse("playground_prompt", args=[body["id"]]))
    detail = bob.get(reverse("api-playground-prompt", args=[body["id"]]))
    assert detail.status_code == 200 and detail.json()["text"] == "hi"

    mallory = _api(cast.mallory)
    theirs = mallory.post(reverse("api-playground"), {"runs": [run.id], "text": "x"}, format="json")
    assert theirs.status_code == 404
    assert mallory.get(reverse("api-playground-prompt", args=[body["id"]])).status_code == 404
    too_many = bob.post(reverse("api-playground"), {"runs": [1] * 5, "text": "x"}, format="json")
    assert too_many.status_code == 400
    assert PlaygroundPrompt.objects.count() == 1
