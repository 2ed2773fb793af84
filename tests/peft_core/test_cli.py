"""`peftlab`: listing, --set parsing, usage errors, and a local training end to end."""

import json

import pytest
import torch

import peft_core
from peft_core import LoraConfig, catalogue
from peft_core.cli import UsageError, main, parse_method_config


def train_args(output, cache, *extra):
    return ["train", "--model", "tiny-llama", "--dataset", "sample-instructions",
            "--output", str(output), "--cache-dir", str(cache), "--max-length", "48", *extra]  # fmt: skip


def test_models_lists_the_catalogue(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "tiny-bert" in out and "causal-lm,seq-cls" in out


def test_datasets_lists_the_samples(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "sample-instructions" in out and "sample-sentiment" in out


# --- --set -------------------------------------------------------------------------


def test_set_values_are_converted_to_the_field_types():
    config = parse_method_config(
        LoraConfig,
        ["r=4", "alpha=32", "dropout=0.05", "use_rslora=true", "target_modules=q_proj, o_proj"],
    )
    assert config == LoraConfig(
        r=4, alpha=32.0, dropout=0.05, use_rslora=True, target_modules=("q_proj", "o_proj")
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("q_proj", ("q_proj",)), ("all-linear", "all-linear"), (".*proj", ".*proj"), ("none", None)],
)
def test_target_modules_reads_names_a_keyword_or_a_regex(value, expected):
    assert parse_method_config(LoraConfig, [f"target_modules={value}"]).target_modules == expected


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("rank=8", "unknown LoraConfig field 'rank'; known: alpha, dropout"),
        ("r=eight", "--set r: cannot read 'eight' as int"),
        ("use_rslora=maybe", "--set use_rslora: cannot read 'maybe'"),
        ("r=0", "LoRA r must be an integer"),
        ("r", "--set expects KEY=VALUE"),
    ],
)
def test_bad_set_values_are_usage_errors(assignment, message):
    with pytest.raises(UsageError, match=message):
        parse_method_config(LoraConfig, [assignment])


def test_usage_errors_exit_2_with_a_message_and_no_traceback(tmp_path, model_cache, capsys):
    with pytest.raises(SystemExit) as caught:
        main(train_args(tmp_path / "out", model_cache, "--set", "rank=8"))
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "peftlab: error: unknown LoraConfig field 'rank'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "gpt-5", "--dataset", "sample-sentiment"],
            "--model 'gpt-5' is not a bundled model",
        ),
        (
            ["--model", "tiny-bert", "--dataset", "sample-instructions"],
            "supports seq-cls, not causal-lm",
        ),
        (
            ["--model", "tiny-llama", "--dataset", "sample-sentiment", "--steps", "0"],
            "steps must be",
        ),
        (["--model", "tiny-llama", "--data", "rows.txt"], "must be a .csv or .jsonl file"),
        (["--model", "tiny-llama", "--data", "missing.csv"], "cannot read"),
    ],
)
def test_bad_train_arguments_exit_2(tmp_path, model_cache, capsys, args, message):
    with pytest.raises(SystemExit) as caught:
        main(["train", *args, "--output", str(tmp_path / "out"), "--cache-dir", str(model_cache)])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_data_file_names_the_line(tmp_path, model_cache, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "fine", "label": "a"}\n{"text": "broken", "label": \n')
    with pytest.raises(SystemExit) as caught:
        main(["train", "--model", "tiny-bert", "--data", str(data), "--output", str(tmp_path / "o"),
              "--cache-dir", str(model_cache)])  # fmt: skip
    assert caught.value.code == 2
    assert "peftlab: error: line 2, column 1: invalid JSON" in capsys.readouterr().err


# --- train end to end -------------------------------------------------------------------


def test_train_writes_the_adapter_and_metrics(tmp_path, model_cache, capsys, input_ids):
    output = tmp_path / "adapter"
    args = train_args(
        output, model_cache, "--set", "r=4", "--set", "alpha=8", "--steps", "3", "--lr", "1e-3"
    )
    assert main(args) == 0
    assert {path.name for path in output.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
    }
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "eval_loss" in records[0]  # the base model
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3]
    assert records[-1]["step"] == 3 and "eval_loss" in records[-1]
    assert json.loads((output / "adapter_config.json").read_text())["r"] == 4
    assert "eval loss: base" in capsys.readouterr().out

    model, _ = catalogue.load_model("tiny-llama", "causal-lm", cache_dir=model_cache)
    peft_core.load_adapter(model, output)
    with torch.no_grad(), peft_core.disabled(model):
        base_logits = model(input_ids).logits
    with torch.no_grad():
        assert not torch.allclose(model(input_ids).logits, base_logits)


def test_the_written_adapter_loads_in_hf_peft(tmp_path, model_cache, input_ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = tmp_path / "adapter"
    assert main(train_args(output, model_cache, "--steps", "2", "--lr", "1e-2")) == 0
    ours, _ = catalogue.load_model("tiny-llama", "causal-lm", cache_dir=model_cache)
    peft_core.load_adapter(ours, output)
    base = AutoModelForCausalLM.from_pretrained(
        catalogue.model_dir("tiny-llama", cache_dir=model_cache)
    )
    theirs = PeftModel.from_pretrained(base, output).eval()
    with torch.no_grad():
        assert torch.allclose(ours(input_ids).logits, theirs(input_ids).logits, atol=1e-5)


def test_train_on_an_uploaded_classification_file(tmp_path, model_cache):
    data = tmp_path / "reviews.csv"
    lines = ["text,label"] + [f"review {i},{'good' if i % 2 else 'bad'}" for i in range(20)]
    data.write_text("\n".join(lines) + "\n")
    output = tmp_path / "adapter"
    args = ["train", "--model", "tiny-bert", "--data", str(data), "--task", "seq-cls",
            "--steps", "2", "--output", str(output), "--cache-dir", str(model_cache)]  # fmt: skip
    assert main(args) == 0
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert "eval_accuracy" in records[-1]
