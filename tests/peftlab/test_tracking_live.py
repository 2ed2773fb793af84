"""Users' own scripts, run as scripts are (a child process with PEFTLAB_URL / PEFTLAB_TOKEN),
against a real server process (gunicorn on the test database) that the tests stop and start:
a transformers Trainer with HF PEFT LoRA and the callback, TRL's SFTTrainer, and a plain
init/log/finish loop that loses nothing across a server restart."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import torch
from django.conf import settings
from safetensors.torch import load_file

from peftlab.client import Client
from tests.workers.test_celery_worker import database_env

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[2]


class Server:
    """gunicorn serving webapp on a free local port, as bin/serve starts it."""

    def __init__(self, log_path: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "gunicorn", "webapp.wsgi", "--bind"]
        command += [f"127.0.0.1:{self.port}", "--workers", "1", "--threads", "4"]
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                command,
                env={**os.environ, **database_env()},
                cwd=settings.BASE_DIR,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health/", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"the server did not start:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture
def server(tmp_path, cast):
    server = Server(tmp_path / "gunicorn.log")
    server.start()
    yield server
    if server.process is not None:
        server.stop()


@pytest.fixture
def user_env(server, alice_token, tmp_path) -> dict:
    """A user's shell: the server and token in the environment, no `peftlab login` file."""
    return {
        **os.environ,
        "PEFTLAB_URL": server.url,
        "PEFTLAB_TOKEN": alice_token,
        "PEFTLAB_CONFIG": str(tmp_path / "no-login.json"),
        "PEFTLAB_SPOOL_DIR": str(tmp_path / "spool"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }


@pytest.fixture
def api(server, alice_token):
    with Client(server.url, alice_token) as client:
        yield client


def _script(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(source))
    return path


def _run(script: Path, env: dict, timeout: int = 240) -> dict:
    """Run the script to its end; its last stdout line is a JSON report."""
    result = subprocess.run(
        [sys.executable, str(script)], env=env, cwd=script.parent, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


TRAINER_SCRIPT = """
    import json, torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from peftlab.client import Client
    from peftlab.integrations import PeftLabCallback

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=4, target_modules=["c_attn"]))
    rows = [{"input_ids": torch.randint(0, 64, (16,)).tolist()} for _ in range(24)]
    rows = [{**row, "labels": row["input_ids"]} for row in rows]
    args = TrainingArguments(
        output_dir="out", max_steps=12, per_device_train_batch_size=2, logging_steps=1,
        eval_strategy="steps", eval_steps=6, per_device_eval_batch_size=4, learning_rate=1e-3,
        save_strategy="no", report_to="none", use_cpu=True, include_num_input_tokens_seen=True,
    )
    callback = PeftLabCallback(project="Default", name="x")
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:8],
                      callbacks=[callback])
    trainer.train()
    status = Client.from_config().run(callback.run.id)["status"]  # just after train() returns
    model.save_pretrained("own")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"run": callback.run.id, "status": status, "trainable": trainable}))
"""


def test_a_users_trainer_script_with_the_callback(tmp_path, user_env, api):
    report = _run(_script(tmp_path, TRAINER_SCRIPT), user_env)
    assert report["status"] == "succeeded"  # when train() returned
    run = api.run(report["run"])
    assert (run["external"], run["method"], run["base_model"]) == (True, "lora", "gpt2")
    assert run["method_config"]["r"] == 4 and run["method_config"]["peft_type"] == "LORA"
    assert run["train_config"]["max_steps"] == 12 and run["total_steps"] == 12
    assert run["profile"]["trainable_params"] == report["trainable"]
    assert run["profile"]["total_params"] > report["trainable"]

    series = api.metrics(run["id"])
    assert series["train_loss"]["step"] == list(range(1, 13))
    assert series["eval_loss"]["step"] == [6, 12]
    assert series["tokens"]["value"][-1] == 12 * 2 * 16
    assert {"learning_rate", "grad_norm", "epoch"} <= set(series)
    assert run["summary"]["train_runtime"] > 0 and "train_loss_mean" in run["summary"]

    # The script's own GPT-2 is no model of the server's: the adapter is kept as the run's
    # adapter all the same (its files checked, its shapes not). Downloaded, it holds the
    # tensors the script trained, and HF PEFT loads it.
    files = api.download_adapter(run["id"], tmp_path / "downloaded")
    assert {path.name for path in files} == {"adapter_config.json", "adapter_model.safetensors"}
    downloaded = load_file(tmp_path / "downloaded" / "adapter_model.safetensors")
    own = load_file(tmp_path / "own" / "adapter_model.safetensors")
    assert downloaded.keys() == own.keys()
    assert all(torch.equal(downloaded[key], own[key]) for key in own)
    _loads_in_hf_peft(tmp_path / "downloaded")


def _loads_in_hf_peft(directory: Path) -> None:
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = PeftModel.from_pretrained(GPT2LMHeadModel(config), directory)
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in model.named_parameters())
    assert model(torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 64)


SFT_SCRIPT = """
    import json
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    from peft_core.catalogue import build_byte_tokenizer
    from peft_core.tiny import build_tiny
    from peftlab.client import Client
    from peftlab.integrations import PeftLabCallback

    rows = Dataset.from_list([{"text": f"{a} plus {a} is {2 * a}"} for a in range(16)])
    args = SFTConfig(
        output_dir="out", max_steps=3, per_device_train_batch_size=4, logging_steps=1,
        max_length=32, save_strategy="no", report_to="none", use_cpu=True,
    )
    callback = PeftLabCallback(project="Default", name="sft", base_model="tiny-llama")
    trainer = SFTTrainer(
        model=build_tiny("llama"), args=args, train_dataset=rows,
        processing_class=build_byte_tokenizer(), callbacks=[callback],
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    print(json.dumps({"run": callback.run.id}))
"""


def test_trl_sft_trainer_with_the_callback(tmp_path, user_env, api):
    report = _run(_script(tmp_path, SFT_SCRIPT), user_env)
    run = api.run(report["run"])
    assert (run["status"], run["method"], run["base_model"]) == ("succeeded", "lora", "tiny-llama")
    assert api.metrics(run["id"])["train_loss"]["step"] == [1, 2, 3]
    # tiny-llama is in the catalogue: the server checked the adapter and keeps it as one.
    files = api.download_adapter(run["id"], tmp_path / "adapter")
    assert {path.name for path in files} == {"adapter_config.json", "adapter_model.safetensors"}
    assert run["profile"]["trainable_params"] > 0


PLAIN_SCRIPT = """
    import json, sys
    import peftlab

    peftlab.Run.finish_wait_s = 1.0  # when the server is still down at the end
    run = peftlab.init(project="Default", name="plain", config={"steps": 500},
                       base_model="my-own-model", method="full", tags=["own"])
    print(json.dumps({"run": run.id}), flush=True)
    for step in range(500):
        if step == 250:
            print("half", flush=True)
            sys.stdin.readline()  # the server is stopped now
        run.log({"train_loss": 1 / (step + 1), "custom/x": step})
    print("logged", flush=True)
    sys.stdin.readline()
    run.finish()
    print(json.dumps({"run": run.id}), flush=True)
"""


@pytest.mark.parametrize("back", ["before the finish", "after the script ended"])
def test_a_server_restart_in_the_middle_loses_nothing(tmp_path, user_env, server, api, back):
    child = subprocess.Popen(
        [sys.executable, str(_script(tmp_path, PLAIN_SCRIPT))], env=user_env, cwd=tmp_path,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        run_id = json.loads(child.stdout.readline())["run"]
        assert child.stdout.readline().strip() == "half"
        server.stop()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "logged"
        if back == "before the finish":
            server.start()
        child.stdin.write("\n")
        child.stdin.flush()
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0, err[-3000:]
    spool = list((tmp_path / "spool").glob("*.jsonl"))
    if back == "before the finish":
        assert spool == []  # the running script sent its own spool
    else:
        assert len(spool) == 1 and "`peftlab sync` sends them" in err
        server.start()
        sync = subprocess.run(
            [sys.executable, "-m", "peftlab.cli", "sync"], env=user_env, capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        assert sync.returncode == 0, sync.stderr
        assert f"run {run_id}: " in sync.stdout and "finished succeeded sent" in sync.stdout
    run = api.run(run_id)
    assert run["status"] == "succeeded"
    series = api.metrics(run_id)
    assert series["custom/x"] == {"step": list(range(500)), "value": [float(s) for s in range(500)]}
    assert series["train_loss"]["step"] == list(range(500))
    assert run["summary"]["custom/x"] == 499


CRASH_SCRIPT = """
    import peftlab

    run = peftlab.init(project="Default", name="crash", base_model="my-own-model", method="lora")
    print(run.id, flush=True)
    peftlab.log({"train_loss": 2.5})
    raise RuntimeError("out of memory, say")
"""


def test_an_uncaught_exception_fails_the_run_at_exit(tmp_path, user_env, api):
    result = subprocess.run(
        [sys.executable, str(_script(tmp_path, CRASH_SCRIPT))], env=user_env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1 and "RuntimeError: out of memory, say" in result.stderr
    run_id = int(result.stdout.split()[0])
    assert api.run(run_id)["status"] == "failed"
    assert api.metrics(run_id)["train_loss"] == {"step": [0], "value": [2.5]}
