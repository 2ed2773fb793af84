"""`peftlab login|runs|sweep` against the real API, in process (see conftest.py)."""

import io
import json
import stat
import threading

import pytest
from django.db import connection

from webapp.experiments import leases
from webapp.experiments.models import Artifact, ArtifactChunk, Dataset, Run, RunStatus

pytestmark = pytest.mark.django_db(transaction=True)

LAUNCH = ("runs", "launch", "--model", "tiny-llama", "--method", "lora")


def test_login_with_a_token_saves_it_privately(offline_cli, alice_token, config_file, server_url):
    result = offline_cli("login", "--url", server_url + "/", "--token", alice_token)
    assert result.code == 0
    assert result.out.strip() == (
        f"Logged in to {server_url} as alice; token saved to {config_file}"
    )
    assert json.loads(config_file.read_text()) == {"url": server_url, "token": alice_token}
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert offline_cli("runs", "list").code == 0  # the next command uses the saved file


def test_login_reads_a_token_from_stdin(offline_cli, alice_token, config_file, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(alice_token + "\n"))
    assert offline_cli("login", "--url", "http://testserver", "--token", "-").code == 0
    assert json.loads(config_file.read_text())["token"] == alice_token


def test_login_with_a_bad_token_saves_nothing(offline_cli, cast, config_file, server_url):
    result = offline_cli("login", "--url", server_url, "--token", "plt_wrong")
    assert result.code == 1
    assert result.err.startswith("peftlab: error: 401: ") and "peftlab login" in result.err
    assert not config_file.exists()


def test_login_with_a_password_creates_a_named_token(
    offline_cli, cast, config_file, server_url, monkeypatch
):
    monkeypatch.setattr("builtins.input", lambda prompt: "bob")
    monkeypatch.setattr("getpass.getpass", lambda prompt: "bob-pw-9")
    monkeypatch.setattr("socket.gethostname", lambda: "laptop")
    result = offline_cli("login", "--url", server_url)
    assert result.code == 0, result.err
    assert "as bob;" in result.out
    token = cast.bob.api_tokens.get()
    assert token.name == "peftlab CLI on laptop"
    assert json.loads(config_file.read_text())["token"].startswith(token.prefix)


def test_launch_queues_the_run_as_asked(peftlab, cast):
    result = peftlab(*LAUNCH, "--dataset", "sample-instructions", "--set", "r=4",
                     "--set", "alpha=8", "--steps", 7, "--learning-rate", 0.001, "--name", "mine",
                     "--checkpoint-every", 3)  # fmt: skip
    assert result.code == 0, result.err
    run = Run.objects.get(name="mine")
    assert result.out.startswith(f"run {run.id} queued: http://testserver/")
    assert (run.status, run.method, run.base_model) == ("queued", "lora", "tiny-llama")
    assert run.total_steps == 7
    assert run.dataset == cast.datasets["sample-instructions"]
    assert run.method_config["r"] == 4 and run.method_config["alpha"] == 8
    assert run.train_config["learning_rate"] == 0.001
    assert run.train_config["checkpoint_every"] == 3
    assert run.created_by == cast.alice


def test_launch_places_the_run_and_an_over_quota_launch_names_the_limit(peftlab, settings):
    result = peftlab(*LAUNCH, "--dataset", "sample-instructions", "--name", "big",
                     "--devices", 2, "--gpu-class", "a100", "--priority", 3)  # fmt: skip
    assert result.code == 0, result.err
    run = Run.objects.get(name="big")
    assert (run.devices, run.gpu_class, run.priority) == (2, "a100", 3)
    settings.TEAM_MAX_QUEUED = 1
    result = peftlab("sweep", "launch", "--model", "tiny-llama", "--dataset",
                     "sample-instructions", "--methods", "lora,ia3", "--devices", 2)  # fmt: skip
    assert result.code == 1
    assert result.err.startswith("peftlab: error: 429: Team Acme has 1 queued runs and this")
    assert Run.objects.count() == 1


def test_launch_finds_a_dataset_by_id_or_exact_name(peftlab, cast):
    upload = Dataset.objects.create(team=cast.acme, name="my pairs", task="causal-lm", row_count=2)
    assert peftlab(*LAUNCH, "--dataset", "my pairs", "--name", "by-name").code == 0
    assert peftlab(*LAUNCH, "--dataset", upload.id, "--name", "by-id").code == 0
    assert {r.dataset_id for r in Run.objects.filter(name__startswith="by-")} == {upload.id}


def test_launch_with_an_ambiguous_dataset_name_lists_the_ids(peftlab, cast):
    twins = [
        Dataset.objects.create(team=cast.acme, name="twin", task="causal-lm") for _ in range(2)
    ]
    result = peftlab(*LAUNCH, "--dataset", "twin")
    assert result.code == 2
    assert all(f"{d.id} (twin)" in result.err for d in twins)
    assert not Run.objects.exists()


def test_launch_with_an_unknown_dataset_is_a_usage_error(peftlab):
    result = peftlab(*LAUNCH, "--dataset", "no-such-data")
    assert result.code == 2
    assert "no dataset 'no-such-data'" in result.err and "sample-instructions" in result.err
    assert not Run.objects.exists()


def test_launch_with_a_bad_value_shows_the_servers_message(peftlab):
    result = peftlab(*LAUNCH, "--dataset", "sample-instructions", "--set", "r=0")
    assert result.code == 1
    assert result.err == (
        "peftlab: error: 400: method_config.r: Ensure this value is greater than or equal to 1.\n"
    )
    assert "Traceback" not in result.err
    assert not Run.objects.exists()


def test_list_prints_an_aligned_table(peftlab, client, sample_id):
    for name, method in (("first", "lora"), ("second", "ia3")):
        client.launch_run(base_model="tiny-llama", dataset=sample_id, method=method, name=name,
                          train_config={"steps": 5})  # fmt: skip
    result = peftlab("runs", "list")
    assert result.code == 0
    header, *rows = result.out.splitlines()
    assert header.split() == ["ID", "STATUS", "METHOD", "MODEL", "STEP", "EVAL_LOSS", "NAME"]
    assert [row.split()[1:] for row in rows] == [
        ["queued", "ia3", "tiny-llama", "0/5", "-", "second"],
        ["queued", "lora", "tiny-llama", "0/5", "-", "first"],
    ]
    starts = [header.index(column) for column in header.split()[1:]]
    assert all(row[s - 2 : s] == "  " and row[s] != " " for row in rows for s in starts)
    filtered = peftlab("runs", "list", "--method", "lora", "--json")
    assert [json.loads(line)["name"] for line in filtered.out.splitlines()] == ["first"]
    assert len(peftlab("runs", "list", "--limit", 1).out.splitlines()) == 2


def test_list_where_and_sort_by_metric(peftlab, cast, make_run):
    for name, loss in (("low", 0.5), ("high", 1.5), ("none", None)):
        make_run(name=name, summary={} if loss is None else {"eval_loss": loss})
    result = peftlab("runs", "list", "--where", "eval_loss<2", "--sort=-eval_loss", "--json")
    assert [json.loads(line)["name"] for line in result.out.splitlines()] == ["high", "low"]
    both = peftlab("runs", "list", "--where", "eval_loss>1", "--search", "HIG", "--json")
    assert [json.loads(line)["name"] for line in both.out.splitlines()] == ["high"]
    bad = peftlab("runs", "list", "--where", "eval_loss<abc")
    assert bad.code == 1 and "q: eval_loss: abc is not a number." in bad.err


def test_cancel_a_queued_run(peftlab, queued_run):
    result = peftlab("runs", "cancel", queued_run["id"])
    assert result.code == 0
    assert result.out.strip() == f"run {queued_run['id']} cancelled"
    assert Run.objects.get(id=queued_run["id"]).status == RunStatus.CANCELLED


def test_watch_an_external_run_to_success(peftlab, client, sample_id):
    run = client.launch_run(base_model="tiny-llama", dataset=sample_id, method="lora",
                            train_config={"steps": 3}, external=True)  # fmt: skip
    client.ingest_metrics(
        run["id"],
        [
            {"key": "train_loss", "step": s, "value": 2.0 / s, "wall_time": 1000.0 + s}
            for s in (1, 2, 3)
        ]
        + [{"key": "eval_loss", "step": 3, "value": 0.875, "wall_time": 1004.0}],
    )
    client.finish_run(run["id"], "succeeded")
    result = peftlab("runs", "watch", run["id"], "--interval", 0.01)
    assert result.code == 0, result.err
    assert result.out.strip() == (
        f"run {run['id']} succeeded at step 3/3: loss 0.6667, eval loss 0.8750"
    )
    assert "loss=0.6667 eval=0.8750 succeeded" in result.err  # the tqdm bar, on stderr


def test_watch_a_failed_run_exits_1_with_its_error(peftlab, queued_run):
    fence = leases.run_claim(run_id=queued_run["id"], worker="test")
    leases.run_finish(run_id=queued_run["id"], fence=fence, status="failed",
                        error="CUDA out of memory at step 3")  # fmt: skip
    result = peftlab("runs", "watch", queued_run["id"])
    assert result.code == 1
    assert f"run {queued_run['id']} failed" in result.out
    assert "error: CUDA out of memory at step 3" in result.out


@pytest.mark.timeout(60)
def test_launch_and_watch_until_cancelled_elsewhere(peftlab):
    def cancel_from_the_browser():  # another connection, as the web page's Cancel button
        Run.objects.filter(name="w").update(status=RunStatus.CANCELLED, error="cancelled by bob")
        connection.close()

    timer = threading.Timer(0.5, cancel_from_the_browser)
    timer.start()
    result = peftlab(*LAUNCH, "--dataset", "sample-instructions", "--name", "w", "--watch",
                     "--interval", 0.05)  # fmt: skip
    timer.join()
    assert result.code == 1
    run_id = Run.objects.get(name="w").id
    assert result.out.splitlines()[0].startswith(f"run {run_id} queued: ")
    assert f"run {run_id} cancelled at step 0/" in result.out
    assert "error: cancelled by bob" in result.out


def test_download_writes_the_adapter(peftlab, queued_run, tmp_path):
    data = b'{"peft_type": "LORA", "r": 4}'
    fence = leases.run_claim(run_id=queued_run["id"], worker="test")
    leases.artifact_store(run_id=queued_run["id"], fence=fence, kind="adapter",
                            name="adapter_config.json", data=data)  # fmt: skip
    leases.artifact_store(run_id=queued_run["id"], fence=fence, kind="log",
                            name="train.log", data=b"not the adapter")  # fmt: skip
    result = peftlab("runs", "download", queued_run["id"], "-o", tmp_path / "adapter")
    assert result.code == 0, result.err
    assert (tmp_path / "adapter" / "adapter_config.json").read_bytes() == data
    assert [p.name for p in (tmp_path / "adapter").iterdir()] == ["adapter_config.json"]
    assert "peft.PeftModel.from_pretrained(base, " in result.out


def test_download_to_the_default_directory(peftlab, queued_run, tmp_path, monkeypatch):
    fence = leases.run_claim(run_id=queued_run["id"], worker="test")
    leases.artifact_store(run_id=queued_run["id"], fence=fence, kind="adapter",
                            name="adapter_config.json", data=b"{}")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert peftlab("runs", "download", queued_run["id"]).code == 0
    assert (tmp_path / f"peftlab-run-{queued_run['id']}-adapter" / "adapter_config.json").exists()


def test_download_refuses_a_hostile_name(peftlab, queued_run, tmp_path):
    artifact = Artifact.objects.create(run_id=queued_run["id"], kind="adapter", name="../evil",
                                       size=1, sha256="0" * 64)  # fmt: skip
    ArtifactChunk.objects.create(artifact=artifact, index=0, data=b"x")
    result = peftlab("runs", "download", queued_run["id"], "-o", tmp_path / "adapter")
    assert result.code == 1
    assert "refusing artifact name '../evil'" in result.err
    assert not (tmp_path / "evil").exists()


def test_download_without_an_adapter_says_so(peftlab, queued_run, tmp_path):
    result = peftlab("runs", "download", queued_run["id"], "-o", tmp_path / "adapter")
    assert result.code == 1
    assert "has no adapter files (it is queued)" in result.err


def test_another_teams_run_is_404(peftlab, cast):
    theirs = Run.objects.create(project=cast.umbrella_project, name="theirs", method="lora",
                                base_model="tiny-llama", dataset=cast.datasets["sample-instructions"])  # fmt: skip
    for action in ("watch", "cancel", "download"):
        result = peftlab("runs", action, theirs.id)
        assert result.code == 1
        assert result.err.startswith("peftlab: error: 404: ")
    assert Run.objects.get(id=theirs.id).status == RunStatus.QUEUED


def test_viewer_cannot_launch(offline_cli, monkeypatch, cast, server_url):
    from webapp.accounts.services import api_token_create

    monkeypatch.setenv("PEFTLAB_URL", server_url)
    monkeypatch.setenv("PEFTLAB_TOKEN", api_token_create(user=cast.carol, name="t")[1])
    result = offline_cli(*LAUNCH, "--dataset", "sample-instructions")
    assert result.code == 1
    assert result.err.startswith("peftlab: error: 403: ")


def test_sweep_launch_creates_a_run_per_method_and_grid_point(peftlab):
    result = peftlab("sweep", "launch", "--model", "tiny-llama", "--dataset", "sample-instructions",
                     "--methods", "lora,ia3", "--grid", "lora.r=4,8", "--steps", 5)  # fmt: skip
    assert result.code == 0, result.err
    runs = Run.objects.filter(sweep__isnull=False)
    assert sorted((r.method, r.method_config.get("r")) for r in runs if r.method == "lora") == [
        ("lora", 4),
        ("lora", 8),
    ]
    assert sorted(r.method for r in runs) == ["ia3", "lora", "lora"]
    assert {r.total_steps for r in runs} == {5}
    assert result.out.startswith(f"sweep {runs[0].sweep_id}: 3 runs queued")


def test_sweep_launch_over_seeds(peftlab):
    result = peftlab("sweep", "launch", "--model", "tiny-llama", "--dataset", "sample-instructions",
                     "--methods", "ia3", "--seeds", 3, "--steps", 5)  # fmt: skip
    assert result.code == 0, result.err
    runs = Run.objects.filter(sweep__isnull=False).order_by("id")
    assert [r.train_config["seed"] for r in runs] == [0, 1, 2]
    assert result.out.startswith(f"sweep {runs[0].sweep_id}: 3 runs queued")
    refused = peftlab("sweep", "launch", "--model", "tiny-llama", "--dataset",
                      "sample-instructions", "--methods", "ia3", "--seeds", 11)  # fmt: skip
    assert refused.code == 1 and "seeds" in refused.err


def test_sweep_watch_reports_each_run(peftlab, client, sample_id):
    sweep = client.launch_sweep(base_model="tiny-llama", dataset=sample_id, methods=["lora", "ia3"],
                                train_config={"steps": 4}, name="s")  # fmt: skip
    first, second = (run["id"] for run in sweep["runs"])
    fence = leases.run_claim(run_id=first, worker="test")
    leases.run_finish(run_id=first, fence=fence, status="succeeded")
    client.cancel_run(second)
    result = peftlab("sweep", "watch", sweep["id"], "--interval", 0.01)
    assert result.code == 1  # one run was cancelled
    assert result.out.splitlines() == [
        f"run {first} succeeded at step 0/4: loss -, eval loss -",
        f"run {second} cancelled at step 0/4: loss -, eval loss -",
        f"sweep {sweep['id']}: 1 cancelled, 1 succeeded",
    ]
    assert "8/8" in result.err  # the bar counts an ended run's steps as done


def test_unreachable_server_names_the_url(offline_cli, monkeypatch):
    from peftlab import cli

    monkeypatch.setattr(cli, "client_options", {})  # a real socket to a closed port
    monkeypatch.setenv("PEFTLAB_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("PEFTLAB_TOKEN", "plt_x")
    result = offline_cli("runs", "list")
    assert result.code == 1
    assert result.err.startswith("peftlab: error: cannot reach http://127.0.0.1:9 ")
    assert "`make run` starts it" in result.err


def test_models_still_runs_the_local_command(peftlab):
    result = peftlab("models")
    assert result.code == 0
    assert "tiny-llama" in result.out


def test_ask_prints_the_base_models_and_each_adapters_answer(peftlab, cast, monkeypatch):
    from webapp.experiments import queue
    from workers.playground import answer_prompt
    from workers.training import execute_run

    run = Run.objects.create(
        project=cast.acme_project,
        name="asked",
        created_by=cast.alice,
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
        method="lora",
        method_config={"r": 4},
        train_config={"steps": 2, "batch_size": 2, "max_length": 32},
        total_steps=2,
    )
    assert execute_run(run.id, worker="w1:1") == "succeeded"
    # The worker answers the moment the prompt is queued (a test has no broker round trip).
    monkeypatch.setattr(
        queue, "enqueue_on_commit", lambda name, prompt_id: answer_prompt(prompt_id)
    )
    result = peftlab("ask", str(run.id), "Add 2 and 3.", "--interval", "0.01")
    assert result.code == 0, result.err
    assert "asked: http://testserver/playground/" in result.err
    assert result.out.startswith("--- base model\n") and f"--- run {run.id}\n" in result.out
    assert peftlab("ask", "12,x", "hi").code == 2
    other = peftlab("ask", "999999", "hi")
    assert other.code == 1 and "No such run" in other.err


def test_a_run_that_never_said_its_steps_lists_the_step_alone():
    """An external run from peftlab.init has no total: "300", not "300/0"."""
    from peftlab.cli import _steps

    assert _steps({"step": 300, "total_steps": 0}) == "300"
    assert _steps({"step": 3, "total_steps": 5}) == "3/5"


def test_watching_a_run_that_never_said_its_steps_ends_on_its_step_alone():
    from peftlab.cli import _result_line

    run = {"id": 9, "status": "succeeded", "step": 300, "total_steps": 0, "metrics": {}}
    assert _result_line(run).startswith("run 9 succeeded at step 300: ")
