"""`peftlab train --model` with a team's own model, without the server: a directory in HF
layout or a Hub id@revision from the HF cache (HF_HUB_OFFLINE=1); the adapter names the base
so that HF PEFT resolves it; refusals are usage errors with the reason."""

import json
import shutil

import pytest
from huggingface_hub import constants as hf_constants

from peft_core.cli import main
from tests.peft_core.test_sources import fill_hub_cache

ARGS = ["--dataset", "sample-instructions", "--method", "lora", "--steps", "2"]
ARGS += ["--batch-size", "2", "--max-length", "48"]


def test_a_directory_trains_and_the_adapter_names_it(tmp_path, model_root, capsys):
    out = tmp_path / "out"
    assert main(["train", "--model", str(model_root / "my-qwen"), *ARGS, "--output", str(out)]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str((model_root / "my-qwen").resolve())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]
    assert "trainable parameters" in capsys.readouterr().out


def test_a_hub_id_trains_offline_from_the_cache(tmp_path, model_root, monkeypatch):
    commit = fill_hub_cache(tmp_path / "hub", "acme/tiny-qwen", model_root / "my-qwen")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    assert main(["train", "--model", "acme/tiny-qwen@main", *ARGS, "--output", str(out)]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["base_model_name_or_path"], saved["revision"]) == ("acme/tiny-qwen", commit)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("acme/absent@main", "not in the HF cache"),
        ("no-such-thing", "is not a bundled model"),
        ("pickled", "pickle weights only"),
    ],
)
def test_refusals_are_usage_errors_with_the_reason(
    tmp_path, model_root, monkeypatch, capsys, model, message
):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pickled = tmp_path / "pickled"
    shutil.copytree(model_root / "my-qwen", pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", model, *ARGS, "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
