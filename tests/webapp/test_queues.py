"""GPU classes, devices, quotas and the fair order, on PostgreSQL and the real broker: a run
goes to the queue of what it needs and a worker serves the queues it can; the reaper resends
to that queue; launches over a quota are refused whole (429, naming the limit); a free worker
takes the run of the team that holds the fewest devices and was served longest ago."""

import threading
from datetime import timedelta

import pytest
from celery.signals import before_task_publish
from django.db import connection
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from tests.webapp.test_compare import _sweep_form
from tests.webapp.test_pages import _form
from webapp.accounts.services import api_token_create
from webapp.celery import app as celery_app
from webapp.experiments import leases, queue, quotas, services
from webapp.experiments.models import EXTERNAL_WORKER, Run, RunStatus, Sweep
from webapp.experiments.reaper import Reaper, queue_length
from workers import tasks

pytestmark = pytest.mark.django_db


@pytest.fixture
def api(cast):
    """api(user): an API client holding a fresh token of the user (as in tests/api)."""

    def client_for(user) -> APIClient:
        _, plain = api_token_create(user=user, name="t")
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {plain}")
        return client

    return client_for


@pytest.fixture
def routed():
    """(task name, args, queue) of every message published."""
    sent = []

    def record(sender=None, body=None, routing_key=None, **_):
        sent.append((sender, tuple(body[0]), routing_key))

    before_task_publish.connect(record, weak=False)
    yield sent
    before_task_publish.disconnect(record)


def _purge(*names: str) -> None:
    with celery_app.connection_for_write() as conn:
        for name in names:
            conn.default_channel.queue_declare(name, durable=True, auto_delete=False)
            conn.default_channel.queue_purge(name)


def _launch(cast, user=None, project=None, **placement) -> Run:
    return services.run_create(
        user=user or cast.bob,
        project=project or cast.acme_project,
        name="run",
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
        method="lora",
        method_config={"r": 4},
        train_config={"steps": 5},
        **placement,
    )


# ---- routing ---------------------------------------------------------------------------------


def test_a_worker_serves_exactly_the_runs_of_its_class_or_any_up_to_its_devices():
    assert queue.worker_queues("a100", 2) == [
        "gpu.a100.x1",
        "gpu.a100.x2",
        "gpu.any.x1",
        "gpu.any.x2",
    ]
    assert queue.worker_queues("any", 1) == ["gpu.any.x1"]
    for worker_class in ("any", "a100", "h100"):
        for worker_devices in range(1, 9):
            served = set(queue.worker_queues(worker_class, worker_devices))
            for run_class in ("any", "a100"):
                for run_devices in range(1, 9):
                    fits = run_class in ("any", worker_class) and run_devices <= worker_devices
                    assert (queue.run_queue(run_class, run_devices) in served) == fits
    assert queue.run_queue_parts("gpu.a100.x4") == ("a100", 4)
    assert queue.run_queue_parts("playground") is None
    with pytest.raises(ValueError):
        queue.run_queue("../etc", 1)


def test_a_launch_sends_the_run_to_the_queue_of_what_it_needs(
    cast, routed, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        plain = _launch(cast)
        big = _launch(cast, devices=4, gpu_class="a100", priority=3)
    assert routed == [
        (queue.TRAIN_RUN, (plain.id,), "gpu.any.x1"),
        (queue.TRAIN_RUN, (big.id,), "gpu.a100.x4"),
    ]
    big.refresh_from_db()
    assert (big.devices, big.gpu_class, big.priority) == (4, "a100", 3)


def test_the_reaper_resends_a_lost_run_to_its_own_queue(cast, make_run, routed):
    _purge("gpu.a100.x4")
    run = make_run(devices=4, gpu_class="a100")
    leases.run_claim(run_id=run.id, worker="w1:1")
    Run.objects.filter(id=run.id).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    reaper = Reaper(lease_s=30, max_attempts=3, resend_after_s=600)
    reaper.connected_since = 0.0
    assert reaper.tick(now=30.0).lost == [run.id]
    assert routed == [(queue.TRAIN_RUN, (run.id,), "gpu.a100.x4")]
    assert queue_length("gpu.a100.x4") == 1
    _purge("gpu.a100.x4")


def test_the_reaper_resends_waiting_runs_only_where_their_own_queue_is_empty(
    cast, make_run, routed
):
    _purge("gpu.any.x1", "gpu.any.x2")
    old = timezone.now() - timedelta(hours=1)
    alone = make_run(devices=2)
    behind = make_run(devices=1)
    Run.objects.filter(id__in=[alone.id, behind.id]).update(created_at=old)
    queue.enqueue_run(behind.id, "gpu.any.x1")  # its message still waits: no second copy
    routed.clear()
    reaper = Reaper(lease_s=30, max_attempts=3, resend_after_s=600)
    reaper.connected_since = 0.0
    reaper.tick(now=30.0)
    assert routed == [(queue.TRAIN_RUN, (alone.id,), "gpu.any.x2")]
    _purge("gpu.any.x1", "gpu.any.x2")


# ---- launch fields ---------------------------------------------------------------------------


def test_the_api_takes_devices_class_and_priority_and_judges_their_bounds(cast, api):
    body = {
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "method": "lora",
        "devices": 2,
        "gpu_class": "h100-sxm",
        "priority": -4,
    }
    response = api(cast.bob).post(reverse("api-runs"), body, format="json")
    assert response.status_code == 201, response.json()
    data = response.json()
    assert (data["devices"], data["gpu_class"], data["priority"]) == (2, "h100-sxm", -4)
    bad = {"devices": 9, "gpu_class": "A100/../x", "priority": 11}
    response = api(cast.bob).post(reverse("api-runs"), body | bad, format="json")
    assert response.status_code == 400
    errors = response.json()
    assert errors["devices"] == ["Ensure this value is less than or equal to 8."]
    assert "Lower-case letters, digits and dashes" in errors["gpu_class"][0]
    assert errors["priority"] == ["Ensure this value is less than or equal to 10."]
    assert Run.objects.count() == 1


def test_a_sweep_applies_its_placement_to_every_run(cast, api):
    body = {
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "methods": ["lora", "ia3"],
        "devices": 2,
        "priority": 5,
    }
    response = api(cast.bob).post(reverse("api-sweeps"), body, format="json")
    assert response.status_code == 201, response.json()
    runs = Run.objects.filter(sweep_id=response.json()["id"])
    assert sorted(runs.values_list("devices", "gpu_class", "priority")) == [(2, "any", 5)] * 2


def test_fsdp_is_judged_with_the_devices_and_base_it_splits(cast, api):
    body = {
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "method": "lora",
        "train_config": {"parallel": "fsdp"},
    }
    one_device = api(cast.bob).post(reverse("api-runs"), body, format="json")
    assert one_device.status_code == 400
    assert "ask for 2 or more devices" in str(one_device.json())
    nf4 = body | {"devices": 2, "train_config": {"parallel": "fsdp", "quantize": "nf4"}}
    quantised = api(cast.bob).post(reverse("api-runs"), nf4, format="json")
    assert quantised.status_code == 400
    assert "cannot split a nf4 base" in str(quantised.json())
    assert not Run.objects.exists()
    sweep = {k: v for k, v in body.items() if k != "method"} | {
        "methods": ["lora", "mam"],
        "devices": 2,
    }
    response = api(cast.bob).post(reverse("api-sweeps"), sweep, format="json")
    assert response.status_code == 201, response.json()
    runs = Run.objects.filter(sweep_id=response.json()["id"])
    assert [run.train_config["parallel"] for run in runs] == ["fsdp", "fsdp"]


def test_the_launch_form_and_the_run_page_show_them(cast, client):
    client.force_login(cast.bob)
    form = client.get(reverse("run_new")).content.decode()
    assert 'name="devices"' in form and 'name="gpu_class"' in form and 'name="priority"' in form
    assert 'name="parallel"' in form and "Fully sharded (FSDP)" in form
    run = _launch(cast, devices=2, gpu_class="a100", priority=7)
    page = client.get(reverse("run_detail", args=[run.id])).content.decode()
    assert "<dt>devices</dt><dd><code>2</code></dd>" in page
    assert "<dt>GPU class</dt><dd><code>a100</code></dd>" in page
    assert "<dt>priority</dt><dd><code>7</code></dd>" in page


# ---- quotas ----------------------------------------------------------------------------------


def test_over_the_team_queue_quota_the_api_answers_429_naming_it(cast, api, settings):
    settings.TEAM_MAX_QUEUED = 2
    _launch(cast)
    _launch(cast, user=cast.alice)
    body = {"base_model": "tiny-llama", "dataset": cast.datasets["sample-instructions"].id}
    response = api(cast.bob).post(reverse("api-runs"), body | {"method": "lora"}, format="json")
    assert response.status_code == 429
    assert response.json()["detail"].startswith("Team Acme has 2 queued runs; its limit is 2.")
    assert Run.objects.count() == 2
    # another team's queue is its own
    assert _launch(cast, user=cast.mallory, project=cast.umbrella_project).status == "queued"


def test_a_sweep_over_quota_is_refused_whole(cast, api, settings):
    settings.TEAM_MAX_QUEUED = 3
    _launch(cast)
    body = {
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "methods": ["lora", "ia3", "dora"],
    }
    response = api(cast.bob).post(reverse("api-sweeps"), body, format="json")
    assert response.status_code == 429
    assert "Team Acme has 1 queued runs and this launch adds 3" in response.json()["detail"]
    assert (Sweep.objects.count(), Run.objects.count()) == (0, 1)


def test_the_sweep_form_over_quota_shows_the_limit_and_its_clone_keeps_the_placement(
    cast, client, settings
):
    client.force_login(cast.bob)
    form = _sweep_form(cast, devices=2, gpu_class="a100", priority=-2)
    assert client.post(reverse("sweep_new"), form).status_code == 302
    sweep = Sweep.objects.get()
    initial = client.get(reverse("sweep_new"), {"clone": sweep.id}).context["form"].initial
    assert (initial["devices"], initial["gpu_class"], initial["priority"]) == (2, "a100", -2)
    settings.TEAM_MAX_QUEUED = 4  # 3 queued, 3 more asked
    response = client.post(reverse("sweep_new"), form)
    assert response.status_code == 429
    assert "Team Acme has 3 queued runs and this launch adds 3" in response.content.decode()
    assert Sweep.objects.count() == 1 and Run.objects.count() == 3


def test_a_run_on_more_devices_than_the_team_may_use_is_refused(cast, settings):
    settings.TEAM_MAX_RUNNING = 4
    with pytest.raises(quotas.QuotaExceeded, match="may use 4 devices at once, its limit"):
        _launch(cast, devices=8)
    assert not Run.objects.exists()


def test_the_launch_rate_counts_a_users_launches_of_the_last_minute(cast, settings, client):
    settings.LAUNCH_RATE = 2
    _launch(cast)
    _launch(cast)
    with pytest.raises(quotas.QuotaExceeded, match="limit is 2 launches a minute"):
        _launch(cast)
    _launch(cast, user=cast.alice)  # per user
    Run.objects.filter(created_by=cast.bob).update(created_at=timezone.now() - timedelta(minutes=2))
    _launch(cast)  # a minute later
    # the form shows the refusal, with the status of the API's answer
    settings.LAUNCH_RATE = 1
    client.force_login(cast.bob)
    data = _form(cast, devices=2, gpu_class="a100", priority=1)
    response = client.post(reverse("run_new"), data)
    assert response.status_code == 429, response.content.decode()[:3000]
    assert "the limit is 1 launches a minute" in response.content.decode()


@pytest.mark.django_db(transaction=True)
def test_two_launches_at_once_cannot_both_pass_the_queue_quota(cast, settings):
    """Each launch locks its team's row before counting: the second counts the first's run."""
    settings.TEAM_MAX_QUEUED = 1
    barrier = threading.Barrier(2)
    outcomes = []

    def launch(user):
        try:
            barrier.wait()
            _launch(cast, user=user)
            outcomes.append("launched")
        except quotas.QuotaExceeded:
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [threading.Thread(target=launch, args=(u,)) for u in (cast.alice, cast.bob)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["launched", "refused"]
    assert Run.objects.count() == 1


# ---- fair order ------------------------------------------------------------------------------


def _serve_one_slot(*, queue_name: str, turns: int) -> list[int]:
    """One worker slot: take the next fair run, train it (claim, succeed), `turns` times."""
    order = []
    for _ in range(turns):
        run_id = leases.run_next_fair(queue=queue_name)
        if run_id is None:
            break
        fence = leases.run_claim(run_id=run_id, worker="w1:1")
        leases.run_finish(run_id=run_id, fence=fence, status=RunStatus.SUCCEEDED)
        order.append(run_id)
    return order


def test_team_b_is_served_before_team_a_s_second_of_eleven_queued_runs(cast, make_run):
    a_runs = [make_run(name=f"a{i}").id for i in range(11)]
    b_run = make_run(project=cast.umbrella_project, created_by=cast.mallory).id
    order = _serve_one_slot(queue_name="gpu.any.x1", turns=12)
    assert order == [a_runs[0], b_run, *a_runs[1:]]  # A's own runs stay first come, first served


def test_a_team_with_a_run_going_waits_behind_one_with_none(cast, make_run):
    busy = make_run(name="a running")
    leases.run_claim(run_id=busy.id, worker="w0:1")
    a_runs = [make_run(name=f"a{i}").id for i in range(11)]
    b_run = make_run(project=cast.umbrella_project, created_by=cast.mallory).id
    assert leases.run_next_fair(queue="gpu.any.x1") == b_run
    assert a_runs[0] not in _serve_one_slot(queue_name="gpu.any.x1", turns=1)


def test_within_a_team_priority_then_first_come(cast, make_run):
    first, urgent, second = make_run(), make_run(priority=5), make_run()
    low = make_run(priority=-1)
    order = _serve_one_slot(queue_name="gpu.any.x1", turns=4)
    assert order == [urgent.id, first.id, second.id, low.id]


def test_a_queue_s_turn_goes_only_to_runs_of_that_queue(cast, make_run):
    make_run(devices=2)
    make_run(gpu_class="a100")
    assert leases.run_next_fair(queue="gpu.any.x1") is None
    assert leases.run_next_fair(queue="playground") is None


def test_a_team_at_its_device_limit_waits_and_gets_a_turn_when_a_run_ends(cast, make_run, settings):
    settings.TEAM_MAX_RUNNING = 2
    running = make_run(devices=2)
    fence = leases.run_claim(run_id=running.id, worker="w0:1")
    held = make_run()
    assert leases.run_next_fair(queue="gpu.any.x1") is None  # Acme holds its 2 devices
    leases.run_finish(run_id=running.id, fence=fence, status=RunStatus.SUCCEEDED)
    assert leases.run_held_after(run_id=running.id) == (held.id, "gpu.any.x1")
    assert leases.run_next_fair(queue="gpu.any.x1") == held.id


def _task_turn(monkeypatch, *, trained: list, taken_first: set) -> None:
    """The worker task with its training replaced by claim + succeed on PostgreSQL; a run in
    `taken_first` is claimed by another worker just before this one tries."""

    def execute_run(run_id, *, worker):
        if run_id in taken_first:
            taken_first.discard(run_id)
            leases.run_claim(run_id=run_id, worker="other:1")
        fence = leases.run_claim(run_id=run_id, worker=worker)
        if fence is None:
            return "skipped"
        leases.run_finish(run_id=run_id, fence=fence, status=RunStatus.SUCCEEDED)
        trained.append(run_id)
        return "succeeded"

    monkeypatch.setattr(tasks, "execute_run", execute_run)


def _deliver(run_id: int, queue_name: str) -> str:
    tasks.train_run.push_request(delivery_info={"routing_key": queue_name}, hostname="w1")
    try:
        return tasks.train_run.run(run_id)
    finally:
        tasks.train_run.pop_request()


def test_every_queued_run_is_trained_by_the_messages_already_sent(cast, make_run, monkeypatch):
    """A message is a turn of its queue: whichever run it names, the runs waiting there and
    the messages sent for them stay one for one, even when another worker takes a chosen run
    first. So no run waits without a message that will reach a worker."""
    a_runs = [make_run(name=f"a{i}").id for i in range(4)]
    b_run = make_run(project=cast.umbrella_project, created_by=cast.mallory).id
    messages = [*a_runs, b_run]  # one per launch, in launch order
    trained: list[int] = []
    _task_turn(monkeypatch, trained=trained, taken_first={b_run})
    results = [_deliver(messages.pop(0), "gpu.any.x1") for _ in range(4)]
    # the turn that chose B found it taken by another worker and trained the next one
    assert results == ["succeeded"] * 4
    assert trained == [a_runs[0], a_runs[1], a_runs[2], a_runs[3]]
    assert Run.objects.get(id=b_run).worker == "other:1"
    assert _deliver(messages.pop(0), "gpu.any.x1") == "nothing waiting"
    assert not Run.objects.filter(status=RunStatus.QUEUED).exists() and not messages


def test_a_turn_spent_on_a_held_team_is_given_back_when_its_run_ends(
    cast, make_run, monkeypatch, routed, settings
):
    settings.TEAM_MAX_RUNNING = 1
    trained: list[int] = []
    _task_turn(monkeypatch, trained=trained, taken_first=set())
    first, second = make_run(), make_run()
    fence = leases.run_claim(run_id=first.id, worker="w0:1")  # another worker trains it
    assert _deliver(second.id, "gpu.any.x1") == "nothing waiting"  # Acme at its limit
    leases.run_finish(run_id=first.id, fence=fence, status=RunStatus.SUCCEEDED)
    third = make_run()
    # any worker's next run of Acme ending sends the held run a turn of its queue
    assert _deliver(third.id, "gpu.any.x1") == "succeeded"
    assert trained == [second.id]
    assert routed == [(queue.TRAIN_RUN, (third.id,), "gpu.any.x1")]


def test_a_run_trained_elsewhere_holds_none_of_the_team_s_devices(cast, make_run, settings):
    settings.TEAM_MAX_RUNNING = 1
    make_run(status=RunStatus.RUNNING, external=True, worker=EXTERNAL_WORKER)
    waiting = make_run()
    assert quotas.running_devices([cast.acme.id]) == {}
    assert leases.run_next_fair(queue="gpu.any.x1") == waiting.id


def test_a_run_cannot_be_sent_without_its_queue():
    with pytest.raises(ValueError, match="enqueue_run"):
        queue.enqueue(queue.TRAIN_RUN, 1)
